"""``onestep-train``: distil a teacher into a few-step student, or score a student on the digits benchmark.

``onestep-train distill`` with no options distils the embedded digits teacher into a 1-step student with DMD2 (about
6 minutes on 2 CPU cores) and prints teacher-vs-student FD-digits. Every option of
:class:`~onestep_pipelines.training.config.DistillConfig` is a flag (``--help``; whole names only, a misspelled one
gets the closest), and ``--config run.yaml`` reads them from a file (flags given on the command line win; a run's own
``config.yaml`` repeats it in a new folder, ``NAME-2``, named on the first line). ``onestep-train evaluate RUN_DIR``
scores a run's student (or any digits student folder); ``onestep-train push RUN_DIR --repo-id user/name`` uploads it
(what ``--push-to-hub`` does, and the retry of an upload that failed). Ctrl-C during training finishes the update
under way, saves a checkpoint and prints the command that resumes the run. Exit codes: 2 bad options, 3 training
diverged, 4 the run finished but its upload failed, 130 stopped by Ctrl-C. Flags, config files and Hub access are
checked before torch or diffusers load, so a mistake is answered at once.

Several processes: ``accelerate launch --config_file training/configs/{ddp,fsdp,fsdp_lora}.yaml -m
onestep_pipelines.training.cli distill ...`` on GPUs (DDP or FSDP2; DeepSpeed is refused); ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m
onestep_pipelines.training.cli distill ...`` on CPU (gloo).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import re
import sys
import textwrap

from . import hub_checks
from .config import OPTION_METHODS, RUN_FILE, DistillConfig, applies, flag, free_output_dir, option_groups, resolve
from .methods import METHODS, TrainingDiverged
from .stopping import TrainingInterrupted, resume_command


class _Formatter(argparse.HelpFormatter):
    """argparse's help, never breaking a line inside a hyphenated word (``--num-steps``, ``Hyper-SD``)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """argparse with whole flags only (no abbreviations: ``--lr`` is not ``--lr-scheduler``) and errors on one line.
    ``main`` answers an unknown flag with this command's usage and the closest flag."""

    command_parsers: dict[str, argparse.ArgumentParser] = {}  # the top level's subcommands (a mistyped one gets a suggestion)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, formatter_class=_Formatter, **kwargs)

    def error(self, message: str):
        typo = re.match(r"argument command: invalid choice: '([^']*)'", message)
        if typo and self.command_parsers:
            message += _did_you_mean(typo.group(1), self.command_parsers)
        if self.command_parsers:  # the top level: its usage is one line and lists the commands
            self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _did_you_mean(word: str, known) -> str:
    """``; did you mean X?``: the names ``word`` begins (an abbreviation, refused), else the closest one."""
    starting = [k for k in known if k.startswith(word)] if word.startswith("--") else []
    close = starting[:3] or difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {close[0] if len(close) == 1 else ', '.join(close[:-1]) + ' or ' + close[-1]}?"


def _one_of(choices: tuple[str, ...]):
    """An argparse ``type`` that accepts one of ``choices`` and answers anything else on one line, with the closest
    choice."""

    def check(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(choices)}){_did_you_mean(value, choices)}")
        return value

    return check


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> int:
    """An unknown flag: the command's usage, and the flag it most resembles (``--learning_rate``: ``--learning-rate``)."""
    flags = [a for a in extras if a.startswith("-")]
    word = (flags or extras)[0].split("=")[0]
    known = [option for action in parser._actions for option in action.option_strings]
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: unrecognized argument {word}{_did_you_mean(word.replace('_', '-'), known)}", file=sys.stderr)
    return 2


def _distill_arguments(sub: argparse.ArgumentParser, method: str | None = None) -> None:
    """Every option as a flag: the options of every method first, then the method-specific ones grouped by the methods
    they apply to; with ``method`` (``--method M --help``) the help shows only M's (the others still parse, so that
    setting one is refused by name)."""
    sub.add_argument("--config", metavar="FILE", help="read options from a YAML or JSON file (keys are the flags' names); flags given here win")
    groups = {methods: sub.add_argument_group(f"options of --method {', '.join(methods)}") for methods in option_groups()}
    defaults = DistillConfig.__dataclass_fields__
    for f in dataclasses.fields(DistillConfig):
        default = defaults[f.name].default
        help_text = f.metadata["help"]
        if f.name == "method":
            help_text = "distillation method: " + "; ".join(f"{name}: {spec.summary}" for name, spec in METHODS.items())
        help_text += f" (default: {default!r})" if default != "" else ""
        shown = method is None or applies(f.name, method)
        kwargs = {"default": argparse.SUPPRESS, "help": help_text.replace("%", "%%") if shown else argparse.SUPPRESS, "dest": f.name}
        where = groups[OPTION_METHODS[f.name]] if f.name in OPTION_METHODS else sub
        if f.type == "bool":
            where.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            choices = f.metadata.get("choices")
            kind = _one_of(choices) if choices else {"int": int, "float": float, "str": str}[f.type]
            metavar = "{" + ",".join(choices) + "}" if choices else {"int": "N", "float": "X", "str": "VALUE"}[f.type]
            where.add_argument(flag(f.name), type=kind, metavar=metavar, **kwargs)


def _method_asked(argv: list[str]) -> str | None:
    """The ``--method`` of a command line, when it names one (``--method M --help`` shows M's options alone)."""
    for i, arg in enumerate(argv):
        value = arg.partition("=")[2] if arg.startswith("--method=") else argv[i + 1] if arg == "--method" and i + 1 < len(argv) else None
        if value in METHODS:
            return value
    return None


def _parser(method: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="onestep-train", description="Distil a diffusion teacher into a 1-4 step student.")
    commands = parser.add_subparsers(dest="command", required=True)
    distill = commands.add_parser(
        "distill", help="distil a teacher into a few-step student",
        usage="%(prog)s [--config FILE] [--FLAG VALUE ...]  (every flag: %(prog)s --help)",
        description="Distil a teacher into a 1-4 step student. Defaults: the embedded digits teacher, DMD2, 1 step. "
                    "--config FILE reads options from a file; when its --output-dir already holds a run (a run's own config.yaml), "
                    "the run goes to a new folder NAME-2, NAME-3, ... (the first line says which), unless --output-dir or --resume is given.",
    )
    _distill_arguments(distill, method)
    evaluate = commands.add_parser(
        "evaluate", help="score a student of a shipped teacher (FD-digits and accuracy)",
        usage="%(prog)s RUN_DIR [--steps N,N,...] [--draws N] [--device {auto,cpu}] [--json FILE]",
        description="Score a student of a shipped teacher (a run folder, a pipeline folder, or a LoRA folder of 'digits' or 'text-digits-sd') on its "
                    "embedded benchmark: FD-digits and accuracy (the class, or the digit the prompt names) of 898 samples from fixed seeds, at each step count.",
    )
    evaluate.add_argument("student", metavar="RUN_DIR", help="a run folder (its student/), a student pipeline folder, or a LoRA student folder of a shipped teacher")
    evaluate.add_argument("--steps", default="", help="comma-separated step counts (default: the student's recommended steps)")
    evaluate.add_argument("--draws", default=1, type=int, metavar="N", help="noise draws of the 898 samples (seeds 1234, 1235, ...); each cell is their mean, "
                                                                        "FDs with their sd over the draws (one draw's FD-digits moves by about 0.5)")
    evaluate.add_argument("--device", default="auto", type=_one_of(("auto", "cpu")), metavar="{auto,cpu}", help="auto: CUDA / MPS when present, else the CPU")
    evaluate.add_argument("--json", default="", metavar="FILE", help="also write the rows to this JSON file")
    cache = commands.add_parser(
        "cache", help="encode a prompt list once into an on-disk embedding cache (for distill --cache)",
        usage="%(prog)s --teacher T (--prompts SOURCE | --data SOURCE) --output DIR [--prompt-column C] [--image-column C] [--resolution N] ...",
        description="Encode the prompts of SOURCE (or the captions and images of --data SOURCE: prompt embeddings and VAE latents) with the "
                    "teacher's own encoders into sharded safetensors files in DIR; `onestep-train distill --teacher T --cache DIR` then trains "
                    "from them without holding them in memory. An interrupted run continues after its last complete shard when started again.",
    )
    cache.add_argument("--teacher", required=True, help="the teacher the run will distil (a pipeline folder, Hub id or shipped text-to-image teacher)")
    sources = cache.add_mutually_exclusive_group(required=True)
    sources.add_argument("--prompts", metavar="SOURCE", help="a text / .jsonl / .json / .csv / .tsv file, or (datasets package) a .parquet file, "
                                                              "a saved dataset folder or a Hub dataset name")
    sources.add_argument("--data", metavar="SOURCE", help="captioned images: a folder (name.png + name.txt), or (datasets package) a .parquet "
                                                           "file, WebDataset .tar shards, a saved dataset folder or a Hub dataset")
    cache.add_argument("--output", required=True, metavar="DIR", help="the cache folder (new, or one an interrupted run left)")
    cache.add_argument("--prompt-column", default="", help="the prompt's (or caption's) field in records (default: prompt, text or caption)")
    cache.add_argument("--image-column", default="", help="--data records: the image's field (default: image, jpg, jpeg, png or webp)")
    cache.add_argument("--resolution", type=int, default=0, help="the run's --resolution (SDXL's embeddings hold the image size); 0 = the pipeline's default")
    cache.add_argument("--shard-rows", type=int, default=4096, help="prompts per shard file")
    cache.add_argument("--batch-size", type=int, default=64, help="prompts encoded at once")
    cache.add_argument("--limit", type=int, default=0, help="stop after this many prompts (0: all)")
    cache.add_argument("--device", default="auto", type=_one_of(("auto", "cpu")), metavar="{auto,cpu}", help="auto: CUDA / MPS when present, else the CPU")
    push = commands.add_parser(
        "push", help="upload a run's student to the Hugging Face Hub (what --push-to-hub does; retries a failed upload)", usage="%(prog)s RUN_DIR --repo-id USER/NAME",
        description="Upload a student to the Hugging Face Hub (token from HF_TOKEN / `hf auth login`); the repository is created when missing.",
    )
    push.add_argument("folder", metavar="RUN_DIR", help="a run folder (its lora/ folder when it has one, else its student/), or a student or LoRA folder")
    push.add_argument("--repo-id", required=True, help="Hub repo id, 'user/name'")
    parser.command_parsers = dict(commands.choices)
    return parser


def _table(rows: list[dict]) -> str:
    """The rows as a table; rows scored on several noise draws show each FD as ``mean ± sd``."""
    spread = any("draws" in r for r in rows)
    width = 14 if spread else 10

    def cell(r, key, digits):
        return f"{r[key]:.{digits}f}" + (f" ± {r[key + ' sd']:.{digits}f}" if key + " sd" in r else "")

    lines = [f"{'model':<22} {'NFE':>4} {'FD-digits':>{width}} {'FD-pixels':>{width}} {'precision':>9} {'recall':>7} {'accuracy':>9} {'copies':>7} {'nearer-A':>8}"]
    lines += [f"{r['model']:<22} {r['NFE']:>4} {cell(r, 'FD-digits', 2):>{width}} {cell(r, 'FD-pixels', 3):>{width}} {r['precision']:>9.3f} {r['recall']:>7.3f} "
              f"{r['accuracy']:>9.3f} {r['copies']:>7.3f} {r['nearer-A']:>8.3f}" for r in rows]
    if spread:
        lines.append(f"(each cell: the mean of {rows[0]['draws']} noise draws)")
    return "\n".join(lines)


def _error(message: str) -> int:
    print(f"onestep-train: error: {message}", file=sys.stderr)
    return 2


def _quiet_optional_backends() -> None:
    """With torchao installed (``--quantize-base``), peft and diffusers import it at their own import, and on a machine
    without its CUDA kernels it logs one warning per kernel (and torch one per enum it registers): noise on every run
    that uses no quantization. Those three loggers report errors only; ``--quantize-base`` still fails loudly."""
    for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _quiet_optional_backends()
    parser = _parser(_method_asked(argv))
    namespace, extras = parser.parse_known_args(argv)
    args = vars(namespace)
    command = args.pop("command")
    if extras:
        return _unrecognized(parser.command_parsers[command], extras)
    return {"distill": _distill, "evaluate": _evaluate, "push": _push, "cache": _cache}[command](args, argv)


def _distill(args: dict, argv: list[str]) -> int:
    try:
        config = _config(args)
        config.check_paths()
        hub_checks.check_run(config)  # a Hub id or an upload that cannot work: refused in seconds, before torch loads
    except ValueError as error:
        return _error(str(error))
    try:
        from .trainer import distill  # torch, diffusers and the teacher load from here on

        result = distill(config)
    except (ValueError, FileNotFoundError) as error:
        return _error(str(error))
    except TrainingDiverged as error:
        print(f"onestep-train: training diverged at {error}", file=sys.stderr)
        return 3
    except TrainingInterrupted as stop:
        return _interrupted(argv, config, f"stopped after update {stop.update} of {config.max_train_steps}", stop.checkpoint)
    except KeyboardInterrupt:
        return _interrupted(argv, config, "stopped", None)
    return _report(result, config)


def _config(flags: dict) -> DistillConfig:
    """The run's options: defaults, ``--config`` file, flags. A config file whose ``output_dir`` holds a run already
    (a run's own config.yaml, repeated) sends the run to a new folder, said on the first line, unless the flags name
    ``--output-dir`` or ``--resume``."""
    config_file = flags.pop("config", None)
    config = resolve(flags, config_file)
    if config_file and "output_dir" not in flags and not config.resume:
        new = free_output_dir(config.output_dir)
        if new != config.output_dir:
            print(f"run folder: {new} (new: {config.output_dir}, the --output-dir of {config_file}, holds a run already; --output-dir chooses another)")
            config = dataclasses.replace(config, output_dir=new)
    return config


def _report(result: dict, config: DistillConfig) -> int:
    """The run's scores, folders and upload, on stdout; 4 when the upload failed."""
    if "student_dir" not in result:  # not the main process of a distributed run
        return 0
    if "scores" in result:
        print(_table(result["scores"]))
    if "straightness" in result:
        print("straightness of the 32-step Euler ODE (0 = straight): " + ", ".join(f"{k} {v:.4f}" for k, v in result["straightness"].items()))
    resumed = result["this_part"]["resumed_from"]
    part = f"; this part: {result['this_part']['steps']} from update {resumed} in {result['this_part']['seconds']:.0f} s" if resumed else ""
    print(f"student: {result['student_dir']}  ({result['steps']} updates in {result['seconds']:.0f} s{part})")
    if "lora_dir" in result:
        print(f"LoRA: {result['lora_dir']}")
    if "hub_url" in result:
        print(f"Hub: {result['hub_url']}")
    if "hub_error" in result:
        print(f"onestep-train: the upload to {config.push_to_hub} failed ({result['hub_error']}); every output is kept in {config.output_dir}. "
              f"Retry the upload with:\n  {result['push_command']}", file=sys.stderr)
        return 4
    return 0


def _run_part(folder: str, parts: tuple[str, ...]) -> str:
    """``folder``, or for a run folder (it has run.json) the first of its ``parts`` (``student``, ``lora``) it holds."""
    if os.path.isfile(os.path.join(folder, RUN_FILE)):
        for part in parts:
            if os.path.isdir(os.path.join(folder, part)):
                return os.path.join(folder, part)
    return folder


def _evaluate(args: dict, argv: list[str]) -> int:
    try:
        steps = [int(s) for s in args["steps"].replace(";", ",").split(",") if s.strip()] if args["steps"] else None
    except ValueError:
        return _error(f"--steps {args['steps']!r} is not a comma-separated list of integers, e.g. 1,2,4.")
    if steps is not None and (not steps or min(steps) < 1):
        return _error(f"--steps {args['steps']!r}: step counts are positive integers.")
    if args["draws"] < 1:
        return _error(f"--draws {args['draws']}: the number of noise draws is a positive integer.")
    folder = args["student"]
    if not os.path.isdir(folder):
        return _error(f"{folder}: no such folder.")
    student = _run_part(folder, ("student", "lora"))
    if student == folder and os.path.isfile(os.path.join(folder, RUN_FILE)):
        return _error(f"{folder} is a run folder without a student yet: the run writes {os.path.join(folder, 'student')} when it ends "
                      "(continue it with onestep-train distill ... --resume latest).")
    from .evaluate import evaluate_student

    name = os.path.basename(os.path.normpath(folder)) if student != folder else None  # a run folder: the run's name
    try:
        rows = evaluate_student(student, steps, args["device"], args["json"] or None, name=name, draws=args["draws"])
    except ValueError as error:
        return _error(str(error))
    print(_table(rows))
    return 0


def _interrupted(argv: list[str], config: DistillConfig, what: str, saved: str | None) -> int:
    """Ctrl-C: what was saved and the command that continues the run (said by the main process); exit status 130
    (128 + SIGINT), as a shell's."""
    if int(os.environ.get("RANK", "0")) != 0:
        return 130
    folder = os.path.join(config.output_dir, "checkpoints")
    if saved is None and os.path.isdir(folder) and any(n.startswith("step-") for n in os.listdir(folder)):
        saved = f"the last checkpoint in {folder}"
    if saved is None:
        again = f"; {config.output_dir} holds no checkpoint: remove it (or choose another --output-dir) to start again" if os.path.isfile(
            os.path.join(config.output_dir, RUN_FILE)) else ""
        print(f"onestep-train: {what} (Ctrl-C) before the first checkpoint: nothing to resume{again}.", file=sys.stderr)
    else:
        launcher = " (under the same launcher: torchrun or accelerate launch)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"onestep-train: {what} (Ctrl-C); saved: {saved}. Resume with{launcher}:\n  {resume_command(argv, config.output_dir)}", file=sys.stderr)
    return 130


def _cache(args: dict, argv: list[str]) -> int:
    import time

    if os.path.isfile(args["output"]):
        return _error(f"--output {args['output']} is a file; choose a folder.")
    from .cache import write_cache
    from .evaluate import pick_device
    from .teachers import load_teacher

    start = time.perf_counter()
    try:
        teacher = load_teacher(args["teacher"], resolution=args["resolution"])
        if teacher.architecture == "digits":
            return _error("--teacher digits is class-conditional: it takes no prompts.")
        teacher.to_device(pick_device(args["device"]))
        record = write_cache(teacher, args["prompts"] or args["data"], args["output"], column=args["prompt_column"], shard_rows=args["shard_rows"],
                             batch_size=args["batch_size"], limit=args["limit"], images=bool(args["data"]), image_column=args["image_column"])
    except ValueError as error:
        return _error(str(error))
    size = sum(os.path.getsize(os.path.join(args["output"], name)) for name in os.listdir(args["output"]))
    resolution = f" --resolution {args['resolution']}" if args["resolution"] else ""
    what, source = ("images", args["data"]) if args["data"] else ("prompts", args["prompts"])
    print(f"cached {record['count']} {what} of {source} for {args['teacher']} in {args['output']}: {len(record['shards'])} shard(s), "
          f"{size / 2**20:.1f} MB, {time.perf_counter() - start:.1f} s. Train with: onestep-train distill --teacher {args['teacher']} "
          f"--cache {args['output']}{resolution} ...")
    return 0


def _push(args: dict, argv: list[str]) -> int:
    if not os.path.isdir(args["folder"]):
        return _error(f"{args['folder']}: no such folder.")
    folder = _run_part(args["folder"], ("lora", "student"))  # a run folder: what --push-to-hub uploads
    from onestep_pipelines.hub import push_student  # (huggingface_hub only)

    try:
        hub_checks.check_push(args["repo_id"], flag="--repo-id")
        url = push_student(folder, args["repo_id"])
    except ValueError as error:
        return _error(str(error))
    except Exception as error:  # network, Hub, permission
        return _error(f"the upload of {folder} to {args['repo_id']} failed ({hub_checks.error_reason(error)}); run this command again to retry.")
    print(f"uploaded {folder} to {url}")
    return 0


def _exit(code: int) -> None:
    """Exit; a worker of a distributed run (torchrun) skips interpreter teardown once its work is saved and flushed:
    gloo's threads can abort the process there ("terminate called without an active exception", about one CPU run
    in two with torch 2.13), which torchrun reports as a failed run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
