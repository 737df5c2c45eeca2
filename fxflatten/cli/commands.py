"""What each ``fxflatten`` subcommand does, written over the public Python API."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch
from torch.fx import GraphModule
from transformers import PreTrainedTokenizerBase

from fxflatten.cli.output import atomic_dir, check_output, write_report
from fxflatten.device import compute_dtype, resolve_device
from fxflatten.errors import FxflattenError, check_parameters_finite
from fxflatten.eval.perplexity import geometric_mean
from fxflatten.eval.report import held_out, perplexity_report, perplexity_table
from fxflatten.export.program import save_program
from fxflatten.graph.capture import capture
from fxflatten.graph.discovery import discover_blocks
from fxflatten.graph.layout import BlockMap
from fxflatten.load import load_model, saved_dtype
from fxflatten.pipeline import flatten
from fxflatten.plans import check_flatten_share
from fxflatten.run.profiler import Profiler
from fxflatten.selection import check_ratio, select_groups
from fxflatten.tables import block_rows, format_table
from fxflatten.text import calibration_windows, evaluation_sets, warn_if_overlapping

log = logging.getLogger(__name__)


def run_inspect(args: argparse.Namespace) -> None:
    """fxflatten inspect: capture a model and print (or dump as JSON) the blocks found in its graph."""
    model, _ = load_model(args.model)
    block_map = discover_blocks(capture(model))
    rows = block_rows(block_map)
    summary = {
        "model": str(args.model),
        "num_blocks": len(block_map.blocks),
        "hidden_size": block_map.hidden_size,
        "block_parameters": block_map.block_parameters,
        "total_parameters": block_map.total_parameters,
        "blocks": rows,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    columns = ["block", "module", "parallel", "heads", "kv_heads", "head_dim", "mlp_width", "activation", "norm", "parameters", "fusable"]
    print(format_table(columns, [[row[c] for c in columns] for row in rows]))
    print(
        f"{len(block_map.blocks)} blocks, hidden size {block_map.hidden_size}, "
        f"{block_map.block_parameters:,} parameters in blocks of {block_map.total_parameters:,} in all"
    )


def load_and_capture(args: argparse.Namespace, profiler: Profiler
                     ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, torch.Tensor, GraphModule, BlockMap]:
    """The first steps of flatten and compress: load and check the model, cut the calibration
    windows, capture the graph and find its blocks. Returns (model, tokenizer, calib, graph, blocks)."""
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    dtype = compute_dtype(args.dtype, device, saved_dtype(args.model))
    log.info("running on %s in %s", device, str(dtype).removeprefix("torch."))
    stream = getattr(args, "stream", False)
    with profiler("load"):
        model, tokenizer = load_model(args.model, dtype, stream=stream, device=device)
        if not stream:
            model.to(device)
            check_parameters_finite(model)
        calib = calibration_windows(tokenizer, args.calib, args.samples, args.seq_len).to(device)
    with profiler("capture"):
        graph = capture(model)
        if stream:
            check_parameters_finite(graph)  # one weight in memory at a time
        block_map = discover_blocks(graph)
    return model, tokenizer, calib, graph, block_map


def run_flatten(args: argparse.Namespace) -> None:
    """fxflatten flatten: choose groups, flatten and widen them, report perplexity, save."""
    if not args.dry_run and not args.out:
        raise FxflattenError("--out DIR is required to write the widened model (or pass --dry-run)")
    if args.out:
        check_output(Path(args.out), args.force)
    check_ratio(args.ratio)
    profiler = Profiler()
    model, tokenizer, calib, graph, block_map = load_and_capture(args, profiler)
    with profiler("select"):
        selection = select_groups(graph, calib, args.ratio, block_map, max_group=args.max_group, progress=True)
    print(selection.table())
    print(f"groups: {selection.groups}  (removes {selection.ratio:.3f} of parameters once pruned back; asked {args.ratio})")
    if args.dry_run:
        return
    warn_if_overlapping(args.calib, args.eval_text)
    with profiler("flatten"):
        result = flatten(graph, groups=selection.groups)
    for index, reason in result.unfused.items():
        print(f"block {index} stays parallel: {reason}")
    sets = evaluation_sets(tokenizer, args.eval_text, args.eval_windows, args.seq_len)
    with profiler("evaluate"):
        scores = held_out({"dense": graph, "widened": result.graph}, sets)
    widened_map = discover_blocks(result.graph)
    report = {
        "model": str(args.model),
        "groups": selection.groups,
        "adjacent_similarity": [float(selection.similarity[i, i + 1]) for i in range(selection.similarity.shape[0] - 1)],
        "layers": {"before": len(block_map.blocks), "after": len(widened_map.blocks)},
        "parameters": {"before": block_map.total_parameters, "after": widened_map.total_parameters},
        "ratio_once_pruned": selection.ratio,
        **perplexity_report(scores),
        "unfused": result.unfused,
    }
    with profiler("save"), atomic_dir(args.out, args.force) as tmp:
        save_program(result.graph, tmp)
        tokenizer.save_pretrained(tmp)
        report["steps"] = profiler.as_dict()
        write_report(tmp, report)
    print(perplexity_table(scores, {"dense": block_map, "widened": widened_map}))
    print(profiler.table())
    print(f"wrote {args.out}")


def run_compress(args: argparse.Namespace) -> None:
    """fxflatten compress: select, flatten, fold, fuse, prune back, evaluate and save."""
    from fxflatten.export.gguf_file import GGUF_FILE, check_gguf, check_gguf_support, write_gguf
    from fxflatten.export.hf import check_same_logits, to_pretrained
    from fxflatten.export.onnx import ONNX_FILE, to_onnx
    from fxflatten.export.quantize import MAX_RATIO
    from fxflatten.export.sharded import write_checkpoint
    from fxflatten.pipeline import compress
    from fxflatten.plans import PruneConfig

    out = Path(args.out)
    check_output(out, args.force)
    check_ratio(args.ratio)
    check_flatten_share(args.flatten_share, args.ratio)
    if args.stream and args.onnx:
        raise FxflattenError("--onnx exports the whole model in memory, which --stream avoids: compress with --stream, "
                             "then run `fxflatten export OUT --out DIR` on the written checkpoint")
    if args.stream and (args.flatten_share is not None or args.width != 1.0):
        raise FxflattenError("--width and --flatten-share give blocks of other shapes, saved as a torch.export program "
                             "that holds every weight in memory: run them without --stream")
    if args.gguf and (args.flatten_share is not None or args.width != 1.0):
        raise FxflattenError("--width and --flatten-share give blocks of other shapes, which a GGUF architecture cannot "
                             "describe: drop --gguf, or them")
    if args.onnx and resolve_device(args.device).type != "cpu":
        raise FxflattenError("--onnx exports and checks the graph in ONNX Runtime on the CPU: compress on the GPU "
                             "without it, then run `fxflatten export OUT --out DIR` on the written checkpoint")
    profiler = Profiler()
    model, tokenizer, calib, graph, block_map = load_and_capture(args, profiler)
    if args.gguf:
        check_gguf_support(model.config, args.gguf)
    sets = evaluation_sets(tokenizer, args.eval_text, args.eval_windows, args.seq_len)
    warn_if_overlapping(args.calib, args.eval_text)
    config = PruneConfig(target=args.target, head_score=args.head_score, refit_inputs=args.input_refit)
    result = compress(graph, args.ratio, calib, config=config, width=args.width, max_group=args.max_group,
                      select=args.select, flatten_share=args.flatten_share, progress=True, profiler=profiler)
    compressed_map = discover_blocks(result.graph)
    with profiler("evaluate"):
        scores = held_out({"dense": graph, "compressed": result.graph}, sets)
    removed = block_map.total_parameters - compressed_map.total_parameters
    report = {
        "model": str(args.model),
        "groups": result.groups,
        "layers": {"before": len(block_map.blocks), "after": len(compressed_map.blocks)},
        "parameters": {"before": block_map.total_parameters, "after": compressed_map.total_parameters},
        "ratio": {"asked": args.ratio, "achieved": removed / block_map.total_parameters},
        **perplexity_report(scores),
        "calibration": {"windows": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
        "device": str(calib.device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "stream": args.stream,
        "select": args.select,
        "flatten_share": args.flatten_share,
        "prune": {"config": vars(config), "width": args.width, "blocks": result.prune.blocks},
        "unfused": result.unfused,
    }
    with profiler("save"), atomic_dir(out, args.force) as tmp:
        try:
            pretrained = to_pretrained(result.graph, model, block_map)
            report["hf_logit_difference"] = check_same_logits(result.graph, pretrained)
            # Computed in --dtype; written in the source's own (bf16 in, bf16 out).
            if args.stream:
                write_checkpoint(pretrained, tmp, saved_dtype(args.model), progress=True)
            else:
                pretrained.to(saved_dtype(args.model)).save_pretrained(tmp)
            report["format"] = "huggingface"
        except FxflattenError as error:
            log.warning("%s; saving a torch.export program instead", error)
            save_program(result.graph, tmp)
            report["format"] = "torch.export"
        tokenizer.save_pretrained(tmp)
        if args.onnx:
            onnx_export = to_onnx(result.graph, tmp / ONNX_FILE)
            report["onnx"] = onnx_export.as_dict()
            print(onnx_export.summary())
        if args.gguf:
            if report["format"] != "huggingface":
                raise FxflattenError("the compressed model is not a standard checkpoint (see the warning above), so no "
                                     "GGUF architecture describes it; nothing was written: compress without --gguf")
            written = write_gguf(pretrained, tokenizer, tmp / GGUF_FILE, args.gguf, gguf_source(args.model), progress=True)
            report["gguf"] = written.as_dict()
            if args.stream:  # reading it back would hold the whole model in memory
                log.warning("the GGUF file was not read back (--stream); check it with `fxflatten export %s --gguf %s`",
                            out, args.gguf)
            else:
                compressed = {domain: p.value for domain, p in scores["compressed"].items()}
                report["gguf"]["perplexity_ratio"] = check_gguf(written.path, compressed, sets, MAX_RATIO)
            print(written.summary())
        report["steps"] = profiler.as_dict()
        write_report(tmp, report)
    print(perplexity_table(scores, {"dense": block_map, "compressed": compressed_map}))
    print(f"groups {result.groups}; removed {removed / block_map.total_parameters:.3f} of parameters (asked {args.ratio})")
    print(profiler.table())
    print(f"wrote {out} ({report['format']})")


def run_eval(args: argparse.Namespace) -> None:
    """fxflatten eval: held-out perplexity and, with --tasks, zero-shot accuracy of a model in memory."""
    from fxflatten.eval.harness import require_lm_eval, zero_shot
    from fxflatten.export.program import load_source
    from fxflatten.graph.capture import MAX_LEN

    if args.tasks is not None:
        require_lm_eval()  # before the model loads: a missing extra should not cost a load first
    source, tokenizer = load_source(args.model)
    graph = source if isinstance(source, GraphModule) else capture(source)
    if args.seq_len > graph.meta[MAX_LEN]:
        raise FxflattenError(f"--seq-len {args.seq_len} exceeds the model's context of {graph.meta[MAX_LEN]} tokens")
    sets = evaluation_sets(tokenizer, args.text, args.windows, args.seq_len)
    block_map = discover_blocks(graph)
    scores = held_out({"model": graph}, sets)["model"]
    print(f"{args.model}: {len(block_map.blocks)} layers, {block_map.total_parameters:,} parameters")
    for domain, result in scores.items():
        print(f"held-out perplexity on {domain}: {result}")
    if len(scores) > 1:
        mean = geometric_mean([result.value for result in scores.values()])
        print(f"held-out perplexity, geometric mean over the {len(scores)} domains: {mean:.3f}")
    if args.tasks is not None:
        scores = zero_shot(graph, tokenizer, args.tasks or None, limit=args.limit, progress=True)
        print(format_table(
            ["task", "acc", "stderr", "acc_norm", "examples"],
            [[s.task, s.acc, s.acc_stderr, s.acc_norm, s.samples] for s in scores],
        ))


def run_export(args: argparse.Namespace) -> None:
    """fxflatten export: ONNX (checked in ONNX Runtime; with --int8, quantized and checked by held-out
    perplexity) or, with --gguf, a GGUF file read back by transformers; the tokenizer and a report,
    into one directory."""
    from fxflatten.export.onnx import ONNX_FILE, to_onnx
    from fxflatten.export.program import load_source
    from fxflatten.export.quantize import MAX_RATIO, quantization_tools, quantize_int8

    out = Path(args.out)
    if out.suffix in (".onnx", ".gguf"):
        raise FxflattenError(f"--out {out}: give a directory (it gets {ONNX_FILE} or model.gguf, the tokenizer and report.json)")
    if args.gguf and (args.int8 or args.with_past):
        raise FxflattenError("--gguf writes a GGUF file, not ONNX: drop --int8 and --with-past, or export twice")
    if args.max_ppl_ratio is not None and not (args.int8 or args.gguf):
        raise FxflattenError("--max-ppl-ratio applies to --int8 and --gguf only; add one or drop it")
    max_ratio = MAX_RATIO if args.max_ppl_ratio is None else args.max_ppl_ratio
    if not max_ratio > 0:
        raise FxflattenError(f"--max-ppl-ratio {max_ratio}: give a positive multiple of the model's perplexity, such as 1.05")
    if args.int8:
        quantization_tools()
    check_output(out, args.force)
    source, tokenizer = load_source(args.model)
    if args.gguf:
        export_gguf(args, source, tokenizer, out, max_ratio)
        return
    # Cut before the export, so that unusable text fails before minutes of work.
    sets = evaluation_sets(tokenizer, args.eval_text, args.eval_windows, args.seq_len) if args.int8 else {}
    with atomic_dir(out, args.force) as tmp:
        target = tmp / ONNX_FILE
        onnx_export = to_onnx(source, tmp / "float" / ONNX_FILE if args.int8 else target, with_past=args.with_past, atol=args.atol)
        report = {"model": str(args.model), "onnx": onnx_export.as_dict()}
        if args.int8:
            int8 = quantize_int8(onnx_export.path, target, sets, onnx_export.external_data, max_ratio)
            shutil.rmtree(onnx_export.path.parent)
            report["int8"] = int8.as_dict()
        tokenizer.save_pretrained(tmp)
        write_report(tmp, report)
    print(onnx_export.summary())
    if args.int8:
        print(int8.summary())
    print(f"wrote {out / ONNX_FILE} ({onnx_export.form}{', int8' if args.int8 else ''}) in {onnx_export.seconds:.0f} s")


def export_gguf(args: argparse.Namespace, source, tokenizer: PreTrainedTokenizerBase, out: Path, max_ratio: float) -> None:
    """fxflatten export --gguf: the model's held-out perplexity, then the file, read back and held to it."""
    from fxflatten.eval.perplexity import perplexity_values
    from fxflatten.export.gguf_file import GGUF_FILE, check_gguf, check_gguf_support, write_gguf

    if isinstance(source, GraphModule):
        raise FxflattenError("--gguf needs a Hugging Face model; this directory holds a torch.export program "
                             "(blocks of other widths, which GGUF architectures cannot describe)")
    check_gguf_support(source.config, args.gguf)
    sets = evaluation_sets(tokenizer, args.eval_text, args.eval_windows, args.seq_len)
    reference = perplexity_values(capture(source), sets)
    with atomic_dir(out, args.force) as tmp:
        written = write_gguf(source, tokenizer, tmp / GGUF_FILE, args.gguf, gguf_source(args.model), progress=True)
        ratio = check_gguf(written.path, reference, sets, max_ratio)
        tokenizer.save_pretrained(tmp)
        write_report(tmp, {"model": str(args.model), "gguf": written.as_dict() | {"perplexity_ratio": ratio}})
    print(written.summary())
    print(f"held-out perplexity read back by transformers: {ratio:.4f}x the model's")
    print(f"wrote {out / GGUF_FILE}")


def gguf_source(spec: str) -> Path | None:
    """The GGUF file a model spec names (for its tokenizer's pre-tokenizer name), if any."""
    from fxflatten.load import default_gguf

    if spec == "default":
        return default_gguf()
    return Path(spec) if str(spec).lower().endswith(".gguf") else None


def run_onnx(args: argparse.Namespace) -> None:
    """fxflatten run-onnx: greedy generation in ONNX Runtime with the tokenizer saved beside the model."""
    from transformers import AutoTokenizer

    from fxflatten.export import ort
    from fxflatten.export.onnx import ONNX_FILE

    path = Path(args.dir)
    model_file = path if path.suffix == ".onnx" else path / ONNX_FILE
    if not model_file.is_file():
        raise FxflattenError(f"{model_file}: no ONNX model here; write one with `fxflatten export MODEL --out DIR`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_file.parent)
    except (OSError, ValueError) as error:
        raise FxflattenError(f"{model_file.parent}: no tokenizer beside the model ({error.__class__.__name__})") from error
    prompt = tokenizer(args.prompt).input_ids
    new = ort.greedy(ort.session(model_file), prompt, args.max_new_tokens, tokenizer.eos_token_id)
    print(tokenizer.decode(prompt + new, skip_special_tokens=True))
