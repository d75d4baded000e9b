"""Command line: ``workbench generate / serve / replay / compare / train``.

Thin: every command parses its flags into a spec and calls the library. Bad input exits with
code 2 and one line naming the problem, never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from workbench.errors import WorkbenchError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the usage too)
        sys.stderr.write(f"workbench: error: {message}\n")
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v < 0 or v != v:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return v


def _share(text: str) -> float:
    v = _nonneg_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text}")
    return v


def _add_generate(sub) -> None:
    from workbench.paths import DEFAULT_MODEL
    p = sub.add_parser("generate", help="generate text, optionally recording a trace")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="local checkpoint directory (default: %(default)s)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=_nonneg_float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--block-size", type=_positive_int, default=16, help="KV cache block size in tokens")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"), default="float32",
                   help="weights and activations; auto: the checkpoint's torch_dtype (default: %(default)s)")
    p.add_argument("--chat", action="store_true",
                   help="lay each prompt out as a user turn with the checkpoint's chat template (instruct models)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--tp", type=_positive_int, default=1,
                   help="tensor-parallel size: local ranks to spawn (docs/tensor-parallel.md)")
    p.add_argument("--tp-algorithm", choices=("allreduce", "reduce_scatter"), default="allreduce",
                   help="All-Reduce RMSNorm algorithm under --tp > 1 (default: %(default)s)")
    _add_arm_options(p)
    _add_record_options(p)
    _add_serve_options(p, live=True)
    p.set_defaults(func=_cmd_generate)


def _add_record_options(p) -> None:
    g = p.add_argument_group("recording (docs/trace-format.md)")
    g.add_argument("--record", metavar="TRACE", help="record a trace store (a Zarr directory) at this path")
    g.add_argument("--overwrite", action="store_true", help="replace an existing trace at --record")
    g.add_argument("--probes", default="all",
                   help="all, light (no attention maps), none, or a list of attention,kv,activations,comm,"
                        "timing,sampler (default: %(default)s)")
    g.add_argument("--attention-layers", help="layers whose attention maps are recorded, e.g. 0-3 (default: all)")
    g.add_argument("--attention-heads", help="heads whose maps are recorded, e.g. 0,2,5 (default: all)")
    g.add_argument("--attention-steps", help="steps whose attention rows are recorded, e.g. 0-100 (default: all)")
    g.add_argument("--user-probe", action="append", default=[], metavar="MODULE:NAME",
                   help="record your own probe: a workbench.UserProbe (or a list of them) named NAME in an "
                        "importable MODULE or a FILE.py; repeatable")


def _spec_from_args(args):
    from workbench.runtime.sampler import SamplerConfig
    from workbench.runtime.session import RunSpec
    spec = RunSpec(model=args.model, max_new_tokens=args.max_new_tokens,
                   sampler=SamplerConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                         seed=args.seed),
                   stop_strings=list(args.stop), device=args.device, block_size=args.block_size, dtype=args.dtype,
                   chat=args.chat)
    if args.prompt:
        spec.prompts = list(args.prompt)
    spec.arm = _arm_settings(args)
    spec.tp, spec.tp_algorithm = args.tp, args.tp_algorithm
    if args.record:
        from workbench.probes.selection import ProbeSelection
        spec.record, spec.overwrite = args.record, args.overwrite
        spec.probes = ProbeSelection.parse(args.probes, args.attention_layers, args.attention_heads,
                                           args.attention_steps)
    if args.user_probe:
        if not args.record:
            raise WorkbenchError("--user-probe records into a trace: add --record TRACE")
        from workbench.probes.user_probe import load_user_probes
        spec.user_probes = [p for ref in args.user_probe for p in load_user_probes(ref)]
    return spec


def _layer_list(text: str) -> list[int]:
    try:
        layers = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("expected at least one layer number")
    return layers


_ARM_FLAGS = {"arm_layers": "layers", "arm_c": "c", "arm_k": "k", "arm_clip_lo": "clip_lo",
              "arm_clip_hi": "clip_hi", "arm_percentile": "percentile", "arm_seed": "seed"}


def _add_arm_options(p) -> None:
    g = p.add_argument_group("activation redistribution (ARM, docs/arm.md)")
    g.add_argument("--arm", action="store_true", help="redistribute MLP activations (default: layer 0)")
    g.add_argument("--arm-layers", type=_layer_list, help="comma-separated layers, e.g. 0,1 (default: 0)")
    g.add_argument("--arm-c", type=float, help="near-zero threshold factor c (default: 0.13)")
    g.add_argument("--arm-k", type=float, help="fraction factor k (default: 1)")
    g.add_argument("--arm-clip-lo", type=float, help="lowest fraction replaced (default: 0.2)")
    g.add_argument("--arm-clip-hi", type=float, help="highest fraction replaced (default: 0.25)")
    g.add_argument("--arm-percentile", type=float, help="percentile scaling positive draws (default: 99.5)")
    g.add_argument("--arm-seed", type=int, help="ARM seed (default: the run's --seed)")


def _arm_settings(args) -> dict | None:
    """RunSpec.arm from the --arm* flags (None when ARM is off); validated by ARMConfig."""
    given = {key: getattr(args, flag) for flag, key in _ARM_FLAGS.items() if getattr(args, flag, None) is not None}
    if not getattr(args, "arm", False):
        if given:
            raise WorkbenchError(f"--{next(f for f, k in _ARM_FLAGS.items() if k in given).replace('_', '-')} needs --arm")
        return None
    from workbench.models.arm import ARMConfig
    return ARMConfig(**given).to_dict()


def _cmd_generate(args) -> int:
    if getattr(args, "serve", False):
        return _generate_and_serve(args)
    return _generate(args, served=False)


def _generate(args, served: bool) -> int:
    """Run the generation; ``served``: a dashboard already shows its trace (no pointer to one)."""
    if args.record and args.tp == 1:
        # The trace writer's worker imports while this process imports torch, so it has started
        # by the prefill, which then keeps every core (probes.recording).
        from workbench.trace import worker_pool
        worker_pool.prestart()
    from workbench.runtime import session
    spec = _spec_from_args(args)
    if args.json:
        result = session.run(spec)
        if result is not None:  # None: a torchrun rank other than 0, which prints nothing
            print(session.result_json(spec, result))
        return 0
    streamer = None
    if len(spec.prompts) == 1:
        streamer = _Streamer(spec)
    result = session.run(spec, on_step=streamer)
    if result is None:  # a torchrun rank other than 0
        return 0
    if streamer is None:
        for prompt, text in zip(spec.prompts, result.texts):
            print(f"--- {prompt!r}\n{prompt}{text}")
    else:
        print()
    steps = len(result.step_seconds)
    decode = f", decode {result.decode_tokens_per_second:.1f} tokens/s" if steps > 1 else ""  # step 0 is the prefill
    print(f"[{steps} step{'s' * (steps != 1)}, prefill {result.prefill_seconds * 1e3:.1f} ms{decode}]",
          file=sys.stderr)
    if spec.record and not served:
        import shlex
        print(f"[trace {spec.record}: see it with `workbench serve {shlex.quote(str(spec.record))}`, "
              f"or workbench.open_trace(...) in Python]", file=sys.stderr)
    return 0


class _Streamer:
    """Streams sequence 0's text; built lazily because the tokenizer is loaded inside the run."""

    def __init__(self, spec) -> None:
        self.spec, self.inner = spec, None

    def __call__(self, event) -> None:
        if self.inner is None:
            from workbench.runtime.session import TextStreamer, encode_prompts, load_tokenizer_only
            tok = load_tokenizer_only(self.spec.model)  # the prompt's last token opens the decode window
            self.inner = TextStreamer(tok, context=encode_prompts(self.spec, tok, max_seq_len=1 << 62)[0])
            sys.stdout.write(self.spec.prompts[0])
        self.inner(event)


def _add_serve_options(p, live: bool = False) -> None:
    g = p.add_argument_group("dashboard (docs/dashboard.md)")
    if live:
        g.add_argument("--serve", action="store_true",
                       help="serve the dashboard of the --record trace while it is generated, until Ctrl-C "
                            "(it also lists the traces beside it, to compare with)")
    g.add_argument("--port", type=int, default=None, help="dashboard port (default: 5006; 0 picks a free one)")
    g.add_argument("--address", default="127.0.0.1",
                   help="interface to listen on (default: %(default)s, this machine only)")
    g.add_argument("--show", action=argparse.BooleanOptionalAction, default=None,
                   help="open a browser tab (default: only in an interactive terminal, never under CI)")


def _want_browser(args) -> bool:
    import os
    if args.show is not None:
        return args.show
    return sys.stdout.isatty() and not os.environ.get("CI")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the dashboard for a trace or a directory of traces")
    p.add_argument("path", help="trace store, or a directory holding trace stores")
    _add_serve_options(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from pathlib import Path

    from workbench.views.server import DEFAULT_PORT, serve
    path = Path(args.path)
    if not path.exists():
        raise WorkbenchError(f"{path} does not exist (give a trace store or a directory of traces)")
    serve(path, port=DEFAULT_PORT if args.port is None else args.port, address=args.address,
          show=_want_browser(args))
    return 0


def _generate_and_serve(args) -> int:
    """generate --serve: the run's dashboard starts before generation and keeps serving after it."""
    import time
    import webbrowser
    from pathlib import Path

    from workbench.views.server import DEFAULT_PORT, start_server_process
    if not args.record:
        raise WorkbenchError("--serve needs --record (the dashboard shows the trace being recorded)")
    from workbench.probes.recording import check_record_path
    check_record_path(args.record, args.overwrite)  # fail before a server starts
    # A busy port is a one-line error here, before the server and the generation start. The
    # dashboard serves the record's directory, opened on this run: earlier runs recorded beside it
    # (not in its subdirectories: the record may sit in a big directory such as /tmp) are listed,
    # and its Compare tab sets this run beside them.
    record = Path(args.record).resolve()
    record.parent.mkdir(parents=True, exist_ok=True)  # a directory of traces from the start
    proc, url = start_server_process(record.parent, address=args.address, trace=record.name, depth=1,
                                     port=DEFAULT_PORT if args.port is None else args.port)
    try:
        print(f"dashboard: {url}", file=sys.stderr, flush=True)
        if _want_browser(args):
            webbrowser.open(url)
        code = _generate(args, served=True)
        print(f"generation finished; dashboard still at {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        return code
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=15)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a default byte-level model on the stdlib's Python sources")
    p.add_argument("--model-kind", choices=["llama", "perceiver_ar"], default="llama")
    p.add_argument("--out", default=None, help="checkpoint directory (default: data/models/<kind>-bytes)")
    p.add_argument("--minutes", type=_nonneg_float, default=15.0, help="wall-clock budget (default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="fixed step count instead of a time budget (reproducible with the same seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="windows per step (default: 8 for llama, as many predicted bytes for perceiver_ar)")
    p.add_argument("--seq-len", type=_positive_int, default=512)
    p.add_argument("--lr", type=_nonneg_float, default=4e-3)
    p.add_argument("--repeat-share", type=_share, default=0.0,
                   help="share of windows that also hold a random string written twice, the usual curriculum for "
                        "induction heads; it grew none in the default models' budget (docs/default-models.md), "
                        "which train without it (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=2)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from workbench.runtime.session import PROJECT_ROOT
    from workbench.training.train import TrainConfig, train_and_save
    default_out = {"llama": "llama-bytes", "perceiver_ar": "perceiver-ar-bytes"}[args.model_kind]
    tc = TrainConfig(model_kind=args.model_kind, out=args.out or str(PROJECT_ROOT / "data" / "models" / default_out),
                     minutes=None if args.steps else args.minutes, steps=args.steps, seed=args.seed,
                     batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, threads=args.threads,
                     device=args.device, repeat_share=args.repeat_share)
    train_and_save(tc)
    return 0


def _add_replay(sub) -> None:
    p = sub.add_parser("replay", help="re-run a recorded generation and check it reproduces the trace")
    p.add_argument("trace", help="trace store directory")
    p.add_argument("--verify", action="store_true", help="re-run and compare tokens step by step")
    p.add_argument("--model", help="checkpoint directory (default: the one recorded in the trace)")
    p.add_argument("--tp", type=_positive_int, help="tensor-parallel size (default: the recorded one)")
    p.set_defaults(func=_cmd_replay)


def _cmd_replay(args) -> int:
    from workbench import replay
    if not args.verify:
        from workbench.trace.reader import open_trace
        tr = open_trace(args.trace)
        print(f"{tr}\nprompts: {tr.metadata.get('prompts')}\nre-run with --verify; explore with: "
              f"workbench serve {args.trace}")
        return 0
    report = replay.verify(args.trace, model=args.model, tp=args.tp)
    if not report.checkpoint_matches:
        print("warning: the checkpoint differs from the one recorded (sha256 mismatch)", file=sys.stderr)
    if report.hooks:
        named = ", ".join(f"{h['fn']} on {h['pattern']}" for h in report.hooks)
        print(f"warning: the recorded run had hooks that may have changed its computation ({named}); "
              f"the replay ran without them", file=sys.stderr)
    print(report.summary())
    return 0 if report.ok else 1


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="two traces side by side: per-layer activation statistics and differences, "
                                       "and how much attention weights changed where both recorded them")
    p.add_argument("run_a", help="trace store directory (a)")
    p.add_argument("run_b", help="trace store directory (b)")
    p.add_argument("--steps", choices=("all", "prefill", "decode"), default="all",
                   help="steps to merge: all, prefill (the prompt) or decode (default: %(default)s)")
    p.add_argument("--sites", help="comma-separated sites (default: every site both traces recorded)")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from workbench.compare import (attention_change, attention_comparable, compare_traces, format_attention_change,
                                   format_comparison)
    from workbench.trace import open_trace
    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else None
    a, b = open_trace(args.run_a), open_trace(args.run_b)
    print(format_comparison(compare_traces(a, b, steps=args.steps, sites=sites)))
    if attention_comparable(a, b):  # sequence 0; the dashboard's Compare tab follows the selected one
        print()
        print(format_attention_change(attention_change(a, b)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    _add_replay(sub)
    _add_compare(sub)
    _add_train(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except WorkbenchError as e:
        sys.stderr.write(f"workbench: error: {e}\n")
        return getattr(e, "exit_code", 2)  # 2: bad input; a failed tensor-parallel rank says 1
    except KeyboardInterrupt:
        sys.stderr.write("workbench: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
