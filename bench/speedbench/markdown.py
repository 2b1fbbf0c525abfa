"""The Markdown report of a speed run: the summary, one table per section, the traces and notes."""


def fmt(value, digits=4):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _cell(value, digits=4):
    """A Markdown table cell: formatted, with pipes escaped."""
    return fmt(value, digits).replace("|", "\\|")


def _status(entry):
    if "error" in entry:
        return "error: " + entry["error"].splitlines()[0][:120]
    if "skipped" in entry:
        return "skipped: " + entry["skipped"]
    return ""


def _row(*cells):
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def _table(header, rows):
    return [_row(*header), "|" + "---|" * len(header), *(_row(*row) for row in rows)]


def _header_lines(result):
    lines = [f"# Speed benchmark, profile `{result['profile']}`: {result['device']}", ""]
    lines.append(f"torch {result['torch']}, torchvision {result['torchvision']}, CUDA {result['cuda']}, cuDNN "
                 f"{result['cudnn']}, Python {result['python']}; {result['cpu_count']} CPUs, {result['torch_threads']} "
                 f"torch threads; load average {result['load_average_start']} at the start, "
                 f"{result.get('load_average_end')} at the end; {result.get('wall_s')} s; commit "
                 f"{result['git_commit']}; {result['started_at']}.")
    if not result.get("complete"):
        lines.append("\n**Incomplete run** (written after each entry; this is the state when it stopped).")
    lines += ["", "## Summary", ""]
    lines += _table(("figure", "anchor (course code, H100)", "naive (ours, same run)", "ours", "ratio ours/naive",
                     "goal", "met?"),
                    [(row["figure"], row["anchor"],
                      fmt(row["naive"]), fmt(row["ours"]) + (f" ({row['ours_config']})" if row.get("ours_config") else ""),
                      fmt(row["ratio"], 3), row["goal"], row["met"]) for row in result["summary"]])
    lines += ["", "Anchors were measured by the issue's authors with the old course code on one H100; they only "
                  "apply to the gpu profile's sizes. Speed goals are judged on the gpu profile only.", ""]
    return lines


def _inference_lines(section):
    rows, naive = [], {}
    for entry in section["entries"]:
        shape, _, config = entry["name"].partition(" | ")
        if entry["key"].endswith("/naive"):
            naive[shape] = entry.get("images_per_s")
        rate = entry.get("images_per_s")
        speedup = rate / naive[shape] if rate and naive.get(shape) else None
        rows.append((shape, config, fmt(rate), fmt(speedup, 3), fmt(entry.get("latency_ms")),
                     fmt(entry.get("agreement")), fmt(entry.get("compile_s"), 3), _status(entry)))
    lines = ["## Inference", "", "img/s: blocks of back-to-back calls (throughput); latency: one call timed "
                                 "alone (host dispatch included).", ""]
    lines += _table(("shape", "configuration", "img/s", "x naive", "latency ms", "agreement", "compile s",
                     "note"), rows)
    lines.append("")
    return lines


def _deviation_note(entry):
    """How far an entry's step computes from its reference, where it measured that."""
    notes = []
    depthwise = entry.get("depthwise_deviation")
    if depthwise:
        notes.append(f"vs native depthwise: output {depthwise['output']:.1e}, gradients {depthwise['grads']:.1e} "
                     f"of the largest value")
    graph = entry.get("graph_deviation")
    if graph:
        notes.append(f"vs {graph['steps']} eager steps: losses {graph['losses']:.1e}, parameters "
                     f"{graph['parameters']:.1e} of the largest value")
    return "; ".join(notes)


def _training_lines(section):
    rows, naive = [], {}
    for entry in section["entries"]:
        if entry["key"] in ("loss_curves", "e2e"):
            continue
        pair, _, config = entry["name"].partition(" | ")
        if entry["key"].endswith("/naive"):
            naive[pair] = entry.get("median_ms")
        ms = entry.get("median_ms")
        speedup = naive[pair] / ms if ms and naive.get(pair) else None
        spread = f"{entry['p10_ms']:.4g}-{entry['p90_ms']:.4g}" if entry.get("p10_ms") else "-"
        compile_s = "-" if "compile_cold_s" not in entry else \
            f"{fmt(entry['compile_cold_s'], 3)} / {fmt(entry.get('compile_warm_s'), 3)}"
        note = _status(entry) or _deviation_note(entry)
        rows.append((pair, config, fmt(ms), spread, fmt(speedup, 3), fmt(entry.get("peak_memory_gib"), 3), compile_s,
                     note))
    lines = ["## Training (one adversarial iteration)", ""]
    lines += _table(("pair", "configuration", "median ms", "p10-p90 ms", "x naive", "peak GiB",
                     "compile s cold / warm", "note"), rows)
    compiled = [entry for entry in section["entries"] if "compile_cold_s" in entry]
    lines += [""] if compiled else []
    for entry in compiled:  # what the cold compile generated, what the warm one loaded
        counts = "; ".join(f"{phase} {', '.join(f'{k} {v}' for k, v in entry.get(f'cache_{phase}', {}).items()) or '-'}"
                           for phase in ("cold", "warm"))
        lines.append(f"- {entry['name'].partition(' | ')[0]} compile caches: {counts}")
    curves = next((e for e in section["entries"] if e["key"] == "loss_curves"), None)
    if curves:
        lines += ["", f"Loss curves ({curves['name']}) {_status(curves)}"]
        for variant, terms in curves.get("deviation_from_fp32", {}).items():
            text = ", ".join(f"{term} max {d['max']:.3g} / mean {d['mean']:.3g}" for term, d in terms.items())
            lines.append(f"- relative deviation of {variant} from fp32: {text}")
        fp32 = curves.get("curves", {}).get("fp32", {}).get("loss_seg")
        if fp32:
            lines.append(f"- fp32 seg loss: {fp32[0]:.4g} -> {fp32[-1]:.4g}")
    e2e = next((e for e in section["entries"] if e["key"] == "e2e"), None)
    if e2e:
        lines += ["", f"Loader-fed iteration: {fmt(e2e.get('median_ms'))} ms vs "
                      f"{fmt(e2e.get('synthetic_median_ms'))} ms on synthetic input (ratio "
                      f"{fmt(e2e.get('ratio_to_synthetic'), 3)}), {e2e.get('workers_per_stream')} workers per "
                      f"stream, first iteration {fmt(e2e.get('first_iteration_s'), 3)} s. {_status(e2e)}"]
    lines.append("")
    return lines


# Sections shown as one table of these fields per entry.
SIMPLE_TABLES = (("pseudolabels", "Pseudo labels", ("images_per_s", "median_ms", "precision", "output_size")),
                 ("mpl", "MPL", ("median_ms", "p10_ms", "p90_ms", "ratio_to_adversarial")),
                 ("loader", "Loader", ("images_per_s", "ms_per_image", "first_batch_s", "workers")),
                 ("lut", "Label remap", ("loop_ms_per_map", "lut_ms_per_map", "project_ms_per_map",
                                         "pil_point_ms_per_map", "speedup", "speedup_pil_point", "identical_output")),
                 ("flops", "FLOPs", ("gflops", "gflops_thop", "params")))


def _simple_lines(section, title, fields):
    rows = [(entry["name"], *(fmt(entry.get(f)) for f in fields), _status(entry)) for entry in section["entries"]]
    return [f"## {title}", ""] + _table(("entry", *fields, "note"), rows) + [""]


def _trace_lines(entry):
    lines = [f"## {entry['name']}", ""]
    if entry.get("top"):
        busy = entry.get("device_busy_ms_per_step")
        lines.append(f"{entry['timer']}; profiled wall {fmt(entry.get('wall_ms_per_step_profiled'))} ms per step"
                     + (f", device busy {fmt(busy)} ms per step" if busy is not None else "") + ".")
        lines.append("")
        lines += _table(("kind", "operator / kernel", "calls per step", "ms per step", "share"),
                        [(row.get("kind", "?"), row["name"], row["calls_per_step"], row["ms_per_step"], row["share"])
                         for row in entry["top"]])
    else:
        lines.append(_status(entry))
    lines.append("")
    return lines


def _notes_lines(result):
    sections = result["sections"]
    notes = [(name, note) for name, section in sections.items() for note in section.get("notes", [])]
    if not (notes or result.get("weights")):
        return []
    lines = ["## Notes", ""]
    for context_path, info in result.get("weights", {}).items():
        losses = (f" (seg loss {info['first_loss']:.3g} -> {info['last_loss']:.3g})"
                  if info.get("first_loss") is not None else "")
        lines.append(f"- weights of {context_path}: {info.get('source')}{losses}")
    lines += [f"- {name}: {note}" for name, note in notes]
    lines.append("")
    return lines


def markdown(result):
    sections = result["sections"]
    lines = _header_lines(result)
    if "inference" in sections:
        lines += _inference_lines(sections["inference"])
    if "training" in sections:
        lines += _training_lines(sections["training"])
    for name, title, fields in SIMPLE_TABLES:
        if name in sections:
            lines += _simple_lines(sections[name], title, fields)
    for entry in sections.get("trace", {}).get("entries", []):
        lines += _trace_lines(entry)
    lines += _notes_lines(result)
    return "\n".join(lines)
