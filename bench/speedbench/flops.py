"""Section ``flops``: GFLOPs (2 x MACs, ``torch.utils.flop_counter`` on the meta device; thop's count
too where installed)."""
import torch

from dataset.labels import NUM_CLASSES

from .common import Job, bind
from .config import R18, R101


def flops_jobs(bench, recorder):
    from model.bisenet import BiSeNet
    from model.discriminator import DSCDiscriminator, FCDiscriminator

    height, width = bench.profile.flops_size
    models = (("BiSeNet-R18", lambda: BiSeNet(context_path=R18), 3, "bisenet-r18"),
              ("BiSeNet-R101", lambda: BiSeNet(context_path=R101), 3, "bisenet-r101"),
              ("FCD", FCDiscriminator, NUM_CLASSES, "fcd"), ("DSC", DSCDiscriminator, NUM_CLASSES, "dsc"))

    def count(build, channels, report_name, thop):
        from torch.utils.flop_counter import FlopCounterMode

        with torch.device("meta"):  # shapes only: no memory, no arithmetic
            network = build().eval()
            x = torch.empty(1, channels, height, width)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network(x)
        result = {"gflops": counter.get_total_flops() / 1e9, "params": sum(q.numel() for q in network.parameters()),
                  "counter": "torch.utils.flop_counter (2 x MACs of convolutions; resizes not counted)"}
        result["gflops_thop"] = None
        if thop:
            try:  # the report's convention (thop, resizes counted as nn.Upsample); optional dependency
                from model.flops import complexity_table

                result["gflops_thop"] = complexity_table(height, width, models=(report_name,))[0].gflops
            except ImportError:
                pass
        return result

    profile = bench.profile
    return [Job("flops", name, f"{name} at {width}x{height}", bind(count, build, channels, report_name, profile.flops_thop),
                settings={"size": f"{width}x{height}", "batch_size": 1}, cost_s=1)
            for name, build, channels, report_name in models if name in profile.flops_models]
