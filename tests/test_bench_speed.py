"""Smoke test of bench/speed.py: every section at toy sizes on the CPU, and the JSON it writes.

No timing is asserted (the numbers mean nothing at these sizes); what is checked is that each
section runs, records what it measured, and that the output has the structure the GPU run relies on.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SPEED = Path(__file__).resolve().parents[1] / "bench" / "speed.py"
SUMMARY_FIELDS = {"figure", "anchor", "naive", "ours", "ours_config", "ratio", "goal", "met", "note"}


def load_speed():
    spec = importlib.util.spec_from_file_location("bench_speed", SPEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return load_speed()


@pytest.fixture(scope="module")
def toy_run(speed, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    threads = torch.get_num_threads()
    try:
        result = speed.main(speed.get_args(["--device", "cpu", "--profile", "toy", "--out", str(out), "--no-compile",
                                            "--threads", "1", "--budget-s", "1000"]))
    finally:
        torch.set_num_threads(threads)
    return result, out


@pytest.mark.slow
def test_toy_run_writes_json_and_markdown(speed, toy_run):
    result, out = toy_run
    data = json.loads((out / "speed_toy.json").read_text())
    assert data["schema"] == speed.SCHEMA and data["profile"] == "toy" and data["complete"] is True
    for field in ("device", "torch", "torchvision", "cpu_count", "load_average_start", "args", "settings"):
        assert field in data
    assert data["device_type"] == "cpu"
    assert set(data["sections"]) == set(speed.SECTIONS)
    for name, section in data["sections"].items():
        assert section["entries"], f"section {name} recorded nothing"
        for entry in section["entries"]:
            assert {"key", "name", "settings", "wall_s"} <= set(entry)
            assert "error" not in entry and "skipped" not in entry, (name, entry.get("error") or entry.get("skipped"))
    assert data["summary"] and all(set(row) == SUMMARY_FIELDS for row in data["summary"])
    markdown = (out / "speed_toy.md").read_text()
    assert "| figure | anchor (course code, H100) | naive (ours, same run) | ours | ratio ours/naive | goal | met? |" \
        in markdown


@pytest.mark.slow
def test_toy_run_measures_each_section(toy_run):
    result, _ = toy_run
    get = {name: {e["key"]: e for e in section["entries"]} for name, section in result["sections"].items()}
    inference = get["inference"]["resnet18/128x64/b1/naive"]
    assert inference["images_per_s"] > 0 and 0.0 <= inference["agreement"] <= 1.0
    assert get["training"]["resnet18+dsc/ours"]["median_ms"] > 0
    curves = get["training"]["loss_curves"]
    assert set(curves["curves"]) == {"fp32", "fp32_cl", "ours"} and len(curves["curves"]["fp32"]["loss_seg"]) == 2
    # On the CPU ours is fp32 too (channels_last, fused Adam): it departs from strict fp32 NCHW by
    # rounding only, far below the 2-5 % of fp16/bf16 autocast on a GPU.
    assert 0.0 < curves["max_rel_diff"] < 1e-3
    assert curves["noise_mean_rel_diff"] < 1e-3  # fp32 NCHW vs fp32 channels_last: rounding only
    assert get["training"]["e2e"]["median_ms"] > 0
    # The batched per-image thresholds equal the course's np.median loop up to float16 rounding.
    assert get["pseudolabels"]["stat_naive"]["max_abs_diff_vs_per_image_thresholds"] < 1e-3
    assert get["pseudolabels"]["pass1"]["images_per_s"] > 0
    assert get["mpl"]["pham"]["ratio_to_adversarial"] > 0
    assert get["loader"]["gta5/workers"]["images_per_s"] > 0 and get["loader"]["cityscapes/1"]["images_per_s"] > 0
    assert get["lut"]["remap"]["identical_output"] is True
    assert get["flops"]["BiSeNet-R18"]["gflops"] > 0


def test_a_failing_entry_is_recorded_and_the_run_goes_on(speed, tmp_path):
    args = speed.get_args(["--device", "cpu", "--profile", "toy", "--out", str(tmp_path)])
    recorder = speed.Recorder(args, speed.PROFILES["toy"], torch.device("cpu"), tmp_path)

    def broken():
        raise RuntimeError("CUDA out of memory (simulated)")

    recorder.run(speed.Job("inference", "broken", "a broken entry", broken))
    recorder.run(speed.Job("inference", "fine", "a fine entry", lambda: {"images_per_s": 1.0}))
    recorder.run(speed.Job("inference", "late", "too expensive", lambda: {}, cost_s=1e9))
    entries = {e["key"]: e for e in recorder.result["sections"]["inference"]["entries"]}
    assert entries["broken"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert entries["fine"]["images_per_s"] == 1.0
    assert entries["late"]["skipped"].startswith("time budget")
    assert json.loads((tmp_path / "speed_toy.json").read_text())["sections"]["inference"]["entries"][0]["key"] == "broken"


def _event(key, device_type, self_device_us, self_cpu_us=0.0, count=1):
    """A profiler average as torch.profiler's key_averages() lists it (the fields trace_tables reads)."""
    return type("Event", (), {"key": key, "count": count, "device_type": getattr(torch.autograd.DeviceType, device_type),
                              "self_device_time_total": self_device_us, "self_cpu_time_total": self_cpu_us})()


def test_trace_counts_each_device_microsecond_once(speed):
    # A launching operator carries its kernel's time as self device time: the busy time is the
    # kernels' sum (1202 + 300 + 98 us), not that plus the operators' (which would be 3002 us).
    averages = [_event("aten::_log_softmax", "CPU", 1202.0, 40.0), _event("softmax_warp_forward", "CUDA", 1202.0),
                _event("aten::convolution", "CPU", 300.0, 15.0, count=2), _event("cudnn_conv", "CUDA", 300.0, count=2),
                _event("Memcpy HtoD", "CUDA", 98.0), _event("aten::view", "CPU", 0.0, 3.0)]
    busy, tables = speed.trace_tables(averages, cuda=True, steps=1)
    assert busy == 1600.0
    assert dict(tables)["kernel"] == [("softmax_warp_forward", 1, 1202.0), ("cudnn_conv", 2, 300.0),
                                      ("Memcpy HtoD", 1, 98.0)]
    assert dict(tables)["operator"] == [("aten::_log_softmax", 1, 1202.0), ("aten::convolution", 2, 300.0)]
    # On the CPU self times exclude children already: all operators, summed once.
    busy_cpu, tables_cpu = speed.trace_tables(averages, cuda=False, steps=1)
    assert busy_cpu == 40.0 + 15.0 + 3.0 and [name for name, _ in tables_cpu] == ["operator"]


LEVER_FIELDS = ("skip_unread_aux", "classifier_first", "matmul_resize", "fused_loss")


def _levers(config):
    return tuple(getattr(config, name) for name in LEVER_FIELDS)


def test_training_levers_are_measured_one_by_one_from_the_naive_baseline():
    """The CUDA training entries add the model's speed levers one at a time (cumulative) after the fast
    paths, ending at the scripts' CUDA default; the naive baseline has none. The CPU default is what
    --classifier-first/--matmul-resize auto give there (off) with the exact skip on. The opt-in fused
    loss follows ours on CUDA. build_training applies the levers to the network and the discriminator."""
    import dataclasses
    from types import SimpleNamespace

    from bench.speedbench.config import (CPU_TRAIN_LEVERS, CUDA_TRAIN_LEVERS, TRAIN_FAST_PATHS_CUDA, TRAIN_NAIVE_CPU,
                                         TRAIN_NAIVE_CUDA, TRAIN_SCRIPTS_CPU, TRAIN_SCRIPTS_CUDA)
    from bench.speedbench.training import build_training

    assert _levers(TRAIN_NAIVE_CUDA) == _levers(TRAIN_NAIVE_CPU) == (False, False, False, False)
    keys = [config.key for config in CUDA_TRAIN_LEVERS]
    chain = CUDA_TRAIN_LEVERS[keys.index("fast_paths"):keys.index("ours") + 1]
    assert chain[0] is TRAIN_FAST_PATHS_CUDA and chain[-1] is TRAIN_SCRIPTS_CUDA
    for before, after in zip(chain, chain[1:]):
        added = [a and not b for a, b in zip(_levers(after), _levers(before))]
        assert sum(added) == 1 and all(a >= b for a, b in zip(_levers(after), _levers(before))), after.key
        assert (after.amp, after.channels_last, after.optimizer) == (before.amp, before.channels_last, before.optimizer)
    assert _levers(TRAIN_SCRIPTS_CUDA) == (True, True, True, False)
    assert _levers(TRAIN_SCRIPTS_CPU) == (True, False, False, False)
    # The opt-in fused loss (--fused-loss, off by default) is timed right after ours: ours + that lever alone.
    fused = CUDA_TRAIN_LEVERS[keys.index("ours") + 1]
    assert fused.key == "fused_loss" and _levers(fused) == (True, True, True, True)
    assert dataclasses.replace(fused, key="ours", label=TRAIN_SCRIPTS_CUDA.label, fused_loss=False) == TRAIN_SCRIPTS_CUDA
    assert not any(config.fused_loss for config in CPU_TRAIN_LEVERS)  # Triton kernels: CUDA only
    # --depthwise dense and triton, each on ours alone, after it on CUDA; only dense on the CPU (Triton: CUDA only).
    depthwise = {config.depthwise: config for config in CUDA_TRAIN_LEVERS if config.depthwise != "native"}
    assert depthwise.keys() == {"dense", "triton"}
    for name, config in depthwise.items():
        assert keys.index(config.key) > keys.index("ours") and config.key == f"ours_depthwise_{name}"
        assert dataclasses.replace(config, key="ours", label=TRAIN_SCRIPTS_CUDA.label, depthwise="native") \
            == TRAIN_SCRIPTS_CUDA
    assert {config.depthwise for config in CPU_TRAIN_LEVERS} == {"native", "dense"}
    # --cuda-graph on ours alone, then every opt-in at once (the goals' entry, also for R101); CUDA only.
    graphed, opt_ins = (CUDA_TRAIN_LEVERS[keys.index(key)] for key in ("ours_cuda_graph", "ours_opt_ins"))
    assert keys.index("ours") < keys.index(graphed.key) < keys.index(opt_ins.key)
    assert dataclasses.replace(graphed, key="ours", label=TRAIN_SCRIPTS_CUDA.label, cuda_graph=False) == TRAIN_SCRIPTS_CUDA
    assert dataclasses.replace(opt_ins, key="ours", label=TRAIN_SCRIPTS_CUDA.label, cuda_graph=False, fused_loss=False,
                               depthwise="native") == TRAIN_SCRIPTS_CUDA
    assert not any(config.cuda_graph for config in CPU_TRAIN_LEVERS)

    bench = SimpleNamespace(device=torch.device("cpu"))
    cuda_levers_on_the_cpu = dataclasses.replace(TRAIN_SCRIPTS_CUDA, amp="off")
    _, model, discriminator, *_ = build_training(bench, "resnet18", "dsc", cuda_levers_on_the_cpu)
    assert model.skip_unread_aux and model.classifier_first and model.resize.matmul and discriminator.upsample.matmul
    assert not model.fused_loss
    _, model, *_ = build_training(bench, "resnet18", "dsc", dataclasses.replace(fused, amp="off"))
    assert model.fused_loss
    _, _, discriminator, *_ = build_training(bench, "resnet18", "dsc", dataclasses.replace(depthwise["dense"], amp="off"))
    assert discriminator.conv1.depthwise.implementation == discriminator.classifier.depthwise.implementation == "dense"
    _, model, discriminator, *_ = build_training(bench, "resnet18", "dsc", TRAIN_NAIVE_CPU)
    assert not (model.skip_unread_aux or model.classifier_first or model.resize.matmul or discriminator.upsample.matmul
                or model.fused_loss)
    assert discriminator.conv1.depthwise.implementation == "native"


@pytest.mark.parametrize("faithful", [True, False])
def test_the_cuda_graph_entry_compares_replayed_steps_with_eager_ones(faithful, monkeypatch, one_thread):
    """graph_deviation runs the same seeded steps eagerly and through GraphedStep. Here the graph is a
    stand-in that runs the captured step again at each replay: the runs then differ only by the
    float32 learning rates (~1e-7); a graph that replays nothing after its first launch leaves the
    parameters of the last steps behind, and the deviation shows it."""
    import dataclasses
    from types import SimpleNamespace

    from bench.speedbench.config import TRAIN_CUDA_GRAPH
    from bench.speedbench.training import graph_deviation

    def capture(function):
        launches = []

        def replay():
            launches.append(1)
            if faithful or len(launches) == 1:
                function()
        return replay
    monkeypatch.setattr("engine.cuda_graph.CudaGraphCapture", lambda stream: capture)
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 3, 32, 64, generator=generator), torch.randint(0, 19, (2, 32, 64), generator=generator),
             torch.randn(2, 3, 32, 64, generator=generator))
    bench = SimpleNamespace(device=torch.device("cpu"), train_batch=lambda: batch)
    config = dataclasses.replace(TRAIN_CUDA_GRAPH, amp="off", cudnn_benchmark=False)
    deviation = graph_deviation(bench, "resnet18", "dsc", config, steps=5)
    if faithful:
        assert deviation["losses"] < 1e-5 and deviation["parameters"] < 1e-5
    else:
        assert deviation["parameters"] > 1e-3


def test_depthwise_entries_record_their_deviation_from_the_native_discriminator(monkeypatch):
    """The depthwise entries check, on the bench's device, that the timed implementation computes the
    native function: dense is within float32 rounding on the CPU; a wrong implementation (the dense
    convolution doubled) shows as an output off by the whole native value."""
    from types import SimpleNamespace

    from bench.speedbench.training import depthwise_deviation
    from engine.precision import Precision
    from model import build_discriminator
    from model.depthwise import block_diagonal

    bench = SimpleNamespace(device=torch.device("cpu"), profile=SimpleNamespace(train_batch=1, train_target=(32, 64)))
    discriminator = build_discriminator("dsc", num_classes=5)
    precision = Precision(torch.device("cpu"), "off")
    deviation = depthwise_deviation(bench, discriminator, "dense", precision)
    assert deviation["output"] < 1e-6 and deviation["grads"] < 1e-5
    assert discriminator.conv1.depthwise.implementation == "dense" and discriminator.conv1.depthwise.weight.grad is None
    monkeypatch.setattr("model.depthwise.block_diagonal", lambda weight: 2 * block_diagonal(weight))
    assert depthwise_deviation(bench, discriminator, "dense", precision)["output"] > 0.5


def test_the_gpu_profile_runs_the_open_goals_first_and_compilations_last(speed):
    """One device call may end before every entry has run: on the gpu profile the eager training and
    MPL entries (goals still open) run before the inference ones (met), each section in its own order,
    and the compilations follow all of them by priority; the cpu profile keeps the files' order."""
    from types import SimpleNamespace

    from bench.speedbench.config import PROFILES, SECTIONS

    jobs = [SimpleNamespace(section=section, phase=0, priority=0, name=f"{section}{n}")
            for section in SECTIONS for n in range(2)]
    jobs += [SimpleNamespace(section="inference", phase=1, priority=2, name="compile_late"),
             SimpleNamespace(section="training", phase=1, priority=1, name="compile_first")]
    names = [jobs[i].name for i in speed.run_order(jobs, PROFILES["gpu"])]
    assert names[:4] == ["training0", "training1", "mpl0", "mpl1"]
    assert names.index("inference1") == len(names) - 3 and names[-2:] == ["compile_first", "compile_late"]
    assert [jobs[i].name for i in speed.run_order(jobs, PROFILES["cpu"])][:-2] == [job.name for job in jobs[:-2]]
