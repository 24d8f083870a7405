"""Options of ``onestep-train distill`` and their validation, before anything heavy loads.

This module imports neither torch nor diffusers: ``onestep-train --help``, a bad flag, a bad config file or a bad
path are answered in well under a second. :func:`resolve` merges defaults, a config file (YAML or JSON) and flags,
in that order; :meth:`DistillConfig.check_paths` checks the file system (output folder, teacher, prompts, data,
resume) with the same care, so that a run that starts is a run that can finish.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field

from onestep_pipelines.benchmark import TEXT_TEACHERS, teacher_folder

from .cache import PromptCache, captioned_images, iter_prompts
from .methods import METHODS, check_method_name

RUN_FILE = "run.json"  # the options a resumed run must share with the run it continues
CONFIG_FILE = "config.yaml"  # the resolved options of a run, written in its folder
DIVERGENCES = ("reverse-kl", "forward-kl", "js")
LOSSES = ("huber", "l2")
PRECISIONS = ("auto", "no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "piecewise_constant")  # diffusers' get_scheduler


def flag(name: str) -> str:
    """``num_steps`` -> ``--num-steps``."""
    return "--" + name.replace("_", "-")


def option(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class DistillConfig:
    """Every option of ``onestep-train distill`` (the CLI flags and their help are built from these fields)."""

    method: str = option("dmd2", "distillation method", tuple(METHODS))
    teacher: str = option("digits", "'digits' (the embedded teacher), 'text-digits-sd' (the shipped text-to-image digits teacher, a StableDiffusionPipeline), "
                                    "or a diffusers pipeline folder or Hub id (SD 1.5, SDXL, SD3, Flux)")
    prompts: str = option("", "text-to-image teachers: the prompts of data-free methods: a text file (one per line), a .jsonl / .json / .csv / "
                              ".tsv file, or (with the datasets package) a .parquet file, a saved dataset folder or a Hub dataset name")
    prompt_column: str = option("", "--prompts / --data records: the prompt's or caption's field (default: prompt, text or caption; for --data "
                                    "caption, text, txt or prompt)")
    cache: str = option("", "text-to-image teachers: a prompt-embedding cache written by `onestep-train cache`, instead of --prompts "
                            "(rows read from disk as batches draw them; the text encoders stay off the training device)")
    data: str = option("", "text-to-image teachers: captioned images: a folder with a .txt caption per image, or (with the datasets package) a "
                           ".parquet file, WebDataset .tar shards, a saved dataset folder or a Hub dataset (--image-column, --prompt-column)")
    image_column: str = option("", "--data records: the image's field (default: image, jpg, jpeg, png or webp)")
    resolution: int = option(0, "text-to-image teachers: image size of training samples (0 = the pipeline's default size: its denoiser's sample size "
                                "times the VAE factor, 512 for SD 1.5, 1024 for SDXL, SD3 and Flux, 32 for the text-digits teachers)")
    output_dir: str = option("onestep-digits-student", "run folder: checkpoints, previews, validation reports, the student")
    num_steps: int = option(1, "student steps (NFE), 1 to 4 (1 to 8 for the consistency family: consistency, hyper-sd, tdd, progressive)")
    timesteps: str = option("", "the times the student is trained and then sampled at, one per step, comma-separated (default: its method's preset): "
                                "VP teachers: integer timesteps (999,749,499,249); flow teachers: sigma x 1000, unshifted (1000,200 = sigmas 1 and 0.2). "
                                "Recorded in the student's scheduler (trained_times), so pipe(num_inference_steps=N) samples there")
    sigmas: str = option("", "flow teachers: --timesteps as sigmas in (0, 1] (1,0.2)")
    max_train_steps: int = option(1000, "generator updates")
    batch_size: int = option(128, "samples per micro-batch and process")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step (all optimizers)")
    learning_rate: float = option(1e-4, "student learning rate (AdamW)")
    lr_scheduler: str = option("constant", "schedule of the student learning rate over --max-train-steps (diffusers' get_scheduler; the other networks keep theirs)", LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, "updates of linear learning-rate warm-up from 0 (any --lr-scheduler but constant and piecewise_constant)")
    lr_step_rules: str = option("", "--lr-scheduler piecewise_constant: multipliers of --learning-rate and the update each holds until, then the "
                                    "last one (diffusers' step_rules): 1:3000,0.2 = x1 before update 3000, x0.2 from there")
    fake_learning_rate: float = option(1e-4, "dmd2, tdm, sid, phased-dmd, scm and hyper-sd with --dmd-weight: fake-score learning rate")
    fake_updates: int = option(1, "dmd2, tdm, sid, phased-dmd, scm and hyper-sd with --dmd-weight: fake-score updates per generator update")
    fake_lora_rank: int = option(0, "dmd2, tdm, sid, phased-dmd, scm and hyper-sd with --dmd-weight: LoRA rank of the fake score (0 trains a full copy; a rank "
                                    "fits large models in less memory)")
    guidance_scale: float = option(1.0, "teacher CFG scale (1 = none; baked into the student)")
    divergence: str = option("reverse-kl", "dmd2, tdm, sid: f-divergence weighting (forward-kl and js need --gan-weight)", DIVERGENCES)
    gan_weight: float = option(0.0, "dmd2, tdm, sid: weight of the GAN head on fake-score features (0 = off)")
    gan_max_time: float = option(0.0, "dmd2, tdm, sid with --gan-weight: the GAN head sees real and student samples noised to their own times in "
                                      "[0.02, this fraction of the noise range] (batched into the fake score's forward: more samples per update) instead "
                                      "of the fake score's (0 = those; real and generated samples differ at low noise)")
    sid_alpha: float = option(1.2, "sid: alpha of the SiD generator loss (1.2 in the paper; 1 drops its squared score-difference term)")
    uni_instruct: bool = option(False, "sid: Uni-Instruct's loss of the expanded --divergence (reverse-kl: SiD at alpha 0.5; forward-kl, js: with the GAN head's "
                                       "density ratio, --gan-weight) instead of SiD's")
    diff_instruct: bool = option(False, "dmd2: Diff-Instruct's integral-KL gradient x0_fake - x0_real, without DMD's normalisation by mean|x - x0_real|")
    lsg_scale: float = option(1.0, "sid: classifier-free guidance of the fake score in both of its uses (LSG; 1 = none)")
    phases: int = option(0, "consistency: ODE phases (PCM, sampled by jumps between phase edges); 0 or 1 = one phase (LCM). phased-dmd: phases of the student's steps "
                            "(0 = one per step). hyper-sd: segments of the first stage, halved each stage down to --num-steps (0 = 8)")
    ode_steps: int = option(32, "consistency, flowmap, tdd, hyper-sd: teacher ODE grid (Euler steps of 1/ode_steps); progressive: the first stage's teacher "
                                "steps (halved each stage down to --num-steps); --target shortcut: smallest step 1/ode_steps (rounded down to a power of "
                                "2); reflow: Euler steps of the teacher ODE that makes the couplings")
    loss: str = option("huber", "consistency, reflow, tdd, hyper-sd: pseudo-Huber or squared L2 distance", LOSSES)
    coupling_count: int = option(16384, "reflow: (noise, sample) couplings generated with the teacher's ODE")
    coupling_dir: str = option("", "reflow: folder of the cached couplings (default: OUTPUT_DIR/couplings); reuse one across runs")
    target_ema: float = option(0.95, "consistency, meanflow, flowmap, twinflow, tdd, hyper-sd: EMA decay of the target network")
    target: str = option("", "meanflow, twinflow: split (no JVP, default), jvp or shortcut; flowmap: euler (no JVP, default), jvp or shortcut (two half jumps "
                             "on dyadic steps); reflow: "
                         "flow (2-rectified flow, default) or distill (only the 1-step jump)")
    source: str = option("teacher", "meanflow, twinflow: velocity from the teacher (distillation) or from data (e - x, no teacher; twinflow: its own real "
                                    "branch in the rectification)")
    jump_fraction: float = option(0.5, "flowmap euler: fraction of each interval integrated by the teacher (Euler steps of at most 1/ode_steps)")
    equal_fraction: float = option(0.25, "meanflow, flowmap, twinflow: fraction of pairs with r = t")
    endpoint_fraction: float = option(0.3, "meanflow, flowmap, twinflow: fraction of t set to 1 and, independently, of r set to 0 (--target shortcut: fraction "
                                           "of the jumps that are the "
                                           "whole interval, 1 to 0)")
    logit_mean: float = option(0.0, "meanflow, flowmap, twinflow, scm: mean of the logit-normal t (scm: of the flow sigma, so log tan t is normal)")
    logit_std: float = option(1.0, "meanflow, flowmap, scm: standard deviation of the logit-normal t")
    student_prediction: str = option("teacher", "progressive, VP teachers: what the student outputs: teacher (the teacher's own, epsilon or v) or "
                                                "v_prediction (Salimans & Ho: x0 stays defined at zero SNR; the student must learn the switch); flow "
                                                "teachers keep their velocity either way", ("teacher", "v_prediction"))
    uncond_fraction: float = option(0.2, "tdd: fraction of samples trained with the null condition (decoupled guidance: the student learns its unconditional map too)")
    student_guidance: float = option(1.0, "tdd: classifier-free guidance the student samples with by default (recorded; any scale can be passed at inference; 1 = none)")
    rectify_weight: float = option(0.5, "twinflow: weight of the rectification loss (the one-step output moved along the twin's velocity difference)")
    dmd_weight: float = option(0.0, "scm: weight of rCM's score regulariser (DMD on the student's samples with a fake score; 0 = plain sCM); hyper-sd: of the "
                                    "score-distillation term of its last stage (0 = none)")
    tangent_time_step: float = option(0.01, "scm, meanflow / flowmap / twinflow --target jvp: the time part of the JVP tangent is a central difference over "
                                            "this step (TrigFlow radians for "
                                            "scm, flow time otherwise; 0 = exact JVP, which a 1000 t time embedding makes noisy)")
    tangent_warmup: int = option(200, "scm: updates over which the tangent term's weight rises from 0 to 1 (0 = none)")
    policy: str = option("gmflow", "piflow: the policy the student outputs: gmflow (Gaussian mixture) or dx (data estimates at evenly spaced times)", ("gmflow", "dx"))
    policy_components: int = option(8, "piflow: mixture components (gmflow) or time nodes (dx) of the policy")
    policy_substeps: int = option(32, "piflow: Euler substeps of the policy per step, in training and (recorded in the scheduler) in sampling")
    student: str = option("", "reward: the student folder to post-train (OUTPUT_DIR/student of an earlier run; sampled with ConsistencyScheduler)")
    reward: str = option("digits", "reward: digits (log p(class) under the shipped reward classifier), clip:FOLDER (CLIP score), or MODULE:NAME (a callable reward(images, "
                         "conditions) -> scores)")
    reward_weight: float = option(1.0, "reward: weight of the reward against the DMD regulariser")
    regularizer: str = option("dmd", "reward: dmd (DMD2's reverse-KL gradient against the teacher, with a fake score) or none (reward hacking)", ("dmd", "none"))
    reward_noise: float = option(0.05, "reward: std of the Gaussian policy around each sample for rewards without a gradient (policy-gradient surrogate)")
    lora_rank: int = option(0, "LoRA rank of the student; 0 trains all weights")
    quantize_base: str = option("none", "the frozen base under LoRA adapters (student, fake score) in int8 (weight-only, torchao; any device) or "
                                        "float8 (torchao; GPUs with float8) instead of the compute precision; needs --lora-rank and, with a fake score, "
                                        "--fake-lora-rank", ("none", "int8", "float8"))
    lora_alpha: float = option(0.0, "LoRA alpha (0 = the rank)")
    lora_targets: str = option("", "comma-separated module names the LoRA adapts (default: attention projections; Qwen-Image, FLUX.2, Z-Image: every linear layer of the blocks)")
    ema_decay: float = option(0.99, "EMA decay of the student weights (0 = no EMA; a resumed run averages with its own --ema-decay from there on)")
    seed: int = option(0, "seed of the whole run")
    device: str = option("auto", "auto (the accelerator accelerate finds: CUDA, MPS, XPU..., else the CPU) or cpu")
    cpu_threads: int = option(0, "CPU threads torch computes with; 0 = auto: OMP_NUM_THREADS when set, else the cores other work leaves free (at least 1), followed during the run")
    mixed_precision: str = option("auto", "auto (the accelerate launch config's; else bf16 for text-to-image teachers on an accelerator that has it, "
                                          "else no), no, fp16 or bf16", PRECISIONS)
    checkpoint_every: int = option(200, "save a resumable checkpoint every N updates")
    checkpoints_to_keep: int = option(2, "checkpoints kept on disk")
    preview_every: int = option(200, "write a preview grid every N updates (0 = never)")
    validation_every: int = option(0, "write a validation report (digits: FD-digits and accuracy; samples) every N updates (0 = never)")
    log_every: int = option(10, "read the losses (progress bar, trackers) and the NaN / inf guard every N updates")
    resume: str = option("", "'latest' or a checkpoint folder to continue from")
    init_from: str = option("", "a checkpoint folder (OUTPUT_DIR/checkpoints/step-N) of an earlier run of the same --method to start this one from: its "
                                "student, EMA and method networks (the fake score...); those it lacks (a GAN head new with --gan-weight), the "
                                "optimizers and the update count start afresh. A second stage with other options (SiD, then SiDA); ignored on --resume")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    log_with: str = option("auto", "tracker for the losses: auto (tensorboard when installed), none, or an accelerate tracker name")
    evaluate: bool = option(True, "print teacher-vs-student FD-digits at the end (digits teacher)")
    push_to_hub: str = option("", "Hub repo id to upload the student to (token from HF_TOKEN / `hf auth login`)")

    def __post_init__(self):
        spec = check_method_name(self.method)
        checks = [
            (1 <= self.num_steps <= max_steps(self.method), "num_steps", f"must be 1 to {max_steps(self.method)} for --method {self.method}"),
            (self.max_train_steps > 0, "max_train_steps", "must be positive"),
            (0 <= self.lr_warmup_steps < self.max_train_steps, "lr_warmup_steps", f"must lie in [0, --max-train-steps = {self.max_train_steps})"),
            (self.lr_warmup_steps == 0 or self.lr_scheduler not in ("constant", "piecewise_constant"), "lr_warmup_steps",
             f"needs an --lr-scheduler with a warm-up ({self.lr_scheduler} has none: use constant_with_warmup)"),
            (self.lr_scheduler != "piecewise_constant" or self.lr_step_rules, "lr_scheduler", "needs --lr-step-rules (e.g. 1:3000,0.2)"),
            (not self.lr_step_rules or self.lr_scheduler == "piecewise_constant", "lr_step_rules",
             f"applies to --lr-scheduler piecewise_constant, not {self.lr_scheduler}"),
            (self.batch_size > 0, "batch_size", "must be positive"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be at least 1"),
            (self.learning_rate > 0, "learning_rate", "must be positive"),
            (self.fake_learning_rate > 0, "fake_learning_rate", "must be positive"),
            (self.fake_updates >= 1, "fake_updates", "must be at least 1"),
            (self.guidance_scale > 0, "guidance_scale", "must be positive (1 = no guidance)"),
            (self.gan_weight >= 0, "gan_weight", "must be 0 (off) or positive"),
            (self.gan_max_time == 0 or 0.02 < self.gan_max_time <= 1, "gan_max_time", "must be 0 (the fake score's times) or lie in (0.02, 1]"),
            (self.gan_max_time == 0 or self.gan_weight > 0, "gan_max_time", "needs the GAN head (--gan-weight > 0)"),
            (self.sid_alpha >= 0, "sid_alpha", "must be 0 or positive"),
            (self.lsg_scale > 0, "lsg_scale", "must be positive (1 = no guidance)"),
            (self.phases >= 0, "phases", "must be 0 or positive"),
            (self.ode_steps >= 1, "ode_steps", "must be at least 1"),
            (self.phases <= 1 or self.method != "consistency" or self.ode_steps % self.phases == 0, "ode_steps", f"must be a multiple of --phases {self.phases}"),
            (self.method != "phased-dmd" or self.num_steps % max(self.phases, 1) == 0, "phases",
             f"must divide --num-steps {self.num_steps} (each phase takes the same number of steps)"),
            (self.resolution >= 0 and self.resolution % 16 == 0, "resolution", "must be 0 (the pipeline's default size) or a positive multiple of 16"),
            (0 <= self.target_ema < 1, "target_ema", "must lie in [0, 1)"),
            (0 <= self.equal_fraction <= 1, "equal_fraction", "must lie in [0, 1]"),
            (0 <= self.endpoint_fraction <= 1, "endpoint_fraction", "must lie in [0, 1]"),
            (0 <= self.jump_fraction < 1, "jump_fraction", "must lie in [0, 1)"),
            (self.logit_std > 0, "logit_std", "must be positive"),
            (self.tangent_warmup >= 0, "tangent_warmup", "must be 0 (none) or positive"),
            (self.dmd_weight >= 0, "dmd_weight", "must be 0 (off) or positive"),
            (self.rectify_weight >= 0, "rectify_weight", "must be 0 (off) or positive"),
            (0 <= self.uncond_fraction < 1, "uncond_fraction", "must lie in [0, 1)"),
            (self.student_guidance > 0, "student_guidance", "must be positive (1 = no guidance)"),
            (0 <= self.tangent_time_step <= 0.2, "tangent_time_step", "must lie in [0, 0.2] (0 = exact JVP)"),
            (self.coupling_count >= 1, "coupling_count", "must be at least 1"),
            (self.reward_weight >= 0, "reward_weight", "must be 0 or positive"),
            (self.policy_components >= (2 if self.policy == "dx" else 1), "policy_components", f"must be at least {2 if self.policy == 'dx' else 1} for --policy {self.policy}"),
            (self.policy_substeps >= 1, "policy_substeps", "must be at least 1"),
            (self.reward_noise > 0, "reward_noise", "must be positive"),
            (self.lora_rank >= 0, "lora_rank", "must be 0 (train all weights) or positive"),
            (self.fake_lora_rank >= 0, "fake_lora_rank", "must be 0 (a full copy) or positive"),
            (self.lora_alpha >= 0, "lora_alpha", "must be 0 (the rank) or positive"),
            (0 <= self.ema_decay < 1, "ema_decay", "must lie in [0, 1)"),
            (self.checkpoint_every > 0, "checkpoint_every", "must be positive"),
            (self.checkpoints_to_keep >= 1, "checkpoints_to_keep", "must be at least 1"),
            (self.preview_every >= 0, "preview_every", "must be 0 (never) or positive"),
            (self.validation_every >= 0, "validation_every", "must be 0 (never) or positive"),
            (self.log_every >= 1, "log_every", "must be at least 1"),
            (self.cpu_threads >= 0, "cpu_threads", "must be 0 (auto) or positive"),
            (self.device == "auto" or self.device == "cpu", "device", "must be auto or cpu"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"{flag(name)} {message}, got {getattr(self, name)!r}.")
        for f in dataclasses.fields(self):
            if f.metadata.get("choices") and getattr(self, f.name) not in f.metadata["choices"]:
                raise ValueError(f"{flag(f.name)} {getattr(self, f.name)!r} is unknown; choose one of {', '.join(f.metadata['choices'])}.")
        if self.lr_step_rules:
            check_lr_step_rules(self.lr_step_rules)
        if self.divergence != "reverse-kl" and self.gan_weight <= 0:
            raise ValueError(f"--divergence {self.divergence} takes the density ratio from the GAN head: set --gan-weight > 0.")
        if self.method == "hyper-sd":
            first = self.phases or 8
            if not halves_to(first, self.num_steps) or self.ode_steps % first:
                raise ValueError(f"--phases {first} (Hyper-SD's first segment count) must be --num-steps {self.num_steps} times a power of 2 and divide "
                                 f"--ode-steps {self.ode_steps}: the segments halve stage by stage down to the step count.")
        if self.method == "progressive":
            if not halves_to(self.ode_steps, self.num_steps) or self.ode_steps == self.num_steps:
                raise ValueError(f"--ode-steps {self.ode_steps} must be --num-steps {self.num_steps} times a power of 2 (at least 2): progressive "
                                 "distillation halves the steps stage by stage.")
        if self.uni_instruct and self.sid_alpha != _defaults()["sid_alpha"]:
            raise ValueError("--uni-instruct replaces SiD's loss (its alpha follows from --divergence): leave --sid-alpha out.")
        if self.target and self.target not in spec.targets:
            allowed = f"choose one of {', '.join(spec.targets)}" if spec.targets else "it takes no --target"
            raise ValueError(f"--target {self.target!r} does not apply to --method {self.method}; {allowed}.")
        if spec.sources and self.source not in spec.sources:
            raise ValueError(f"--source {self.source!r} does not apply to --method {self.method}; choose one of {', '.join(spec.sources)}.")
        if not spec.sources and self.source != "teacher":
            raise ValueError(f"--source applies to meanflow and twinflow; --method {self.method} learns from the teacher.")
        defaults = _defaults()
        for methods, names in option_groups().items():  # an option of other methods, set for this one, is refused
            names = [n for n in names if getattr(self, n) != defaults[n]]
            if self.method not in methods and names:
                listed = " and ".join(filter(None, [", ".join(flag(n) for n in names[:-1]), flag(names[-1])]))
                raise ValueError(f"{listed} {'applies' if len(names) == 1 else 'apply'} to --method {', '.join(methods)}, not {self.method}.")
        if self.timesteps or self.sigmas:
            self.student_times()
            if self.method == "scm" and not self.dmd_weight:
                raise ValueError(f"{'--timesteps' if self.timesteps else '--sigmas'}: sCM trains at every time; its roll-out times apply with --dmd-weight "
                                 "(rCM). Choose sCM's sampling times at inference (pipe(sigmas=...)).")
        if self.quantize_base != "none":
            if self.method in ("reward", "piflow"):
                raise ValueError(f"--quantize-base {self.quantize_base} does not apply to --method {self.method} (it changes the base weights).")
            if not self.lora_rank:
                raise ValueError(f"--quantize-base {self.quantize_base} quantizes the frozen base under a LoRA student: pass --lora-rank.")
            if applies("fake_lora_rank", self.method) and not self.fake_lora_rank and (self.method not in ("scm", "hyper-sd") or self.dmd_weight):
                raise ValueError(f"--quantize-base {self.quantize_base}: the fake score of --method {self.method} would be a trained full copy "
                                 "of the quantized base; pass --fake-lora-rank too.")
        if self.method == "piflow" and self.lora_rank:
            raise ValueError("--method piflow trains a new policy head with the whole network: --lora-rank is not supported.")
        if self.method == "reward":
            if not self.student:
                raise ValueError("--method reward post-trains a student: pass --student FOLDER (OUTPUT_DIR/student of an earlier run).")
            check_reward_spec(self.reward)
            if self.regularizer == "none" and (self.gan_weight or self.divergence != "reverse-kl"):
                raise ValueError("--regularizer none trains no fake score: --gan-weight and --divergence need --regularizer dmd.")
        if sum(map(bool, (self.prompts, self.data, self.cache))) > 1:
            raise ValueError("pass one of --prompts, --cache and --data.")
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise ValueError("--mixed-precision fp16 needs a GPU, and --device cpu runs on the CPU: use --mixed-precision bf16 or no.")

    def student_times(self) -> tuple[str, list[float]] | None:
        """``("timesteps" | "sigmas", values)`` of ``--timesteps`` / ``--sigmas`` (None: the method's preset), checked as
        far as the teacher is not needed: one value per student step, strictly decreasing, sigmas in (0, 1]."""
        if self.timesteps and self.sigmas:
            raise ValueError("pass --timesteps or --sigmas, not both.")
        kind = "timesteps" if self.timesteps else "sigmas" if self.sigmas else None
        if kind is None:
            return None
        text = getattr(self, kind)
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{flag(kind)} {text!r}: not a comma-separated list of numbers.") from None
        if len(values) != self.num_steps:
            raise ValueError(f"{flag(kind)} {text!r}: {len(values)} value(s) for --num-steps {self.num_steps}; give one per student step.")
        if any(b >= a for a, b in zip(values, values[1:])) or values[-1] <= (0 if kind == "sigmas" else -1):
            raise ValueError(f"{flag(kind)} {text!r}: the times must be strictly decreasing and {'positive' if kind == 'sigmas' else 'at least 0'}.")
        if kind == "sigmas" and values[0] > 1:
            raise ValueError(f"--sigmas {text!r}: sigmas lie in (0, 1].")
        return kind, values

    def comparable(self) -> dict:
        """The options a resumed run must share with the run it continues (those that apply to its method: an
        option another method reads, whose default may have changed since, does not stop a resume)."""
        keep = ("method", "teacher", "prompts", "prompt_column", "cache", "data", "image_column", "resolution", "num_steps", "timesteps", "sigmas", "batch_size",
                "gradient_accumulation_steps", "lora_rank", "quantize_base", "lora_targets", "fake_lora_rank", "seed", "divergence", "gan_weight", "gan_max_time",
                "dmd_weight", "uni_instruct", "diff_instruct", "phases", "ode_steps", "student_prediction", "target", "source", "jump_fraction", "coupling_count",
                "student", "reward", "regularizer", "policy", "policy_components")
        return {k: getattr(self, k) for k in keep if applies(k, self.method)}

    def changed_options(self, previous: dict) -> dict[str, tuple]:
        """``{name: (previous value, this value)}`` of the :meth:`comparable` options that differ from a run's
        ``previous`` ones (its ``run.json`` or a checkpoint's state). An option the run predates counts as its default;
        the batch per process is left out (it may change with the number of processes: the trainer checks the global
        batch)."""
        defaults = _defaults()
        return {k: (previous.get(k, defaults[k]), v) for k, v in self.comparable().items()
                if k != "batch_size" and previous.get(k, defaults[k]) != v}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------ file system
    @property
    def digits_teacher(self) -> bool:
        return self.teacher == "digits" or is_digits_pipeline(self.teacher, "--teacher")

    def check_paths(self, teacher: bool = True) -> None:
        """Refuse, with the flag's name, anything on disk that would stop the run later (nothing is written);
        ``teacher=False`` when the teacher is given in memory (benchmarks)."""
        self._check_output_dir()
        if self.student and not os.path.isfile(os.path.join(self.student, "model_index.json")):
            raise ValueError(f"--student {self.student} is not a pipeline folder (no model_index.json); pass OUTPUT_DIR/student of an earlier run.")
        if self.coupling_dir and os.path.exists(self.coupling_dir) and not os.path.isdir(self.coupling_dir):
            raise ValueError(f"--coupling-dir {self.coupling_dir} is a file; pass a folder (new, or one of earlier couplings).")
        if not teacher:
            return
        self._check_teacher()
        if self.prompts and not os.path.exists(self.prompts) and not _looks_like_hub_id(self.prompts):
            raise ValueError(f"--prompts {self.prompts}: no such file.")
        if self.prompts and os.path.isfile(self.prompts):
            if next(iter_prompts(self.prompts, self.prompt_column), None) is None:
                raise ValueError(f"--prompts {self.prompts} holds no prompt.")
        cache = PromptCache(self.cache) if self.cache else None  # a readable cache folder (its teacher is checked once it loads)
        if self.data:
            if not os.path.exists(self.data) and not _looks_like_hub_id(self.data):
                raise ValueError(f"--data {self.data}: no such folder.")
            shards = os.path.isdir(self.data) and any(n.endswith(".tar") for n in os.listdir(self.data))
            dataset = os.path.isdir(self.data) and any(os.path.isfile(os.path.join(self.data, n)) for n in ("dataset_info.json", "dataset_dict.json"))
            if os.path.isdir(self.data) and not (captioned_images(self.data) or shards or dataset):
                raise ValueError(f"--data {self.data} holds no image with a caption (name.png + name.txt), no WebDataset .tar shards and no saved dataset.")
        if self.digits_teacher and (self.prompts or self.data or self.cache):
            raise ValueError("the digits teacher trains on the embedded digits; --prompts, --cache and --data are for text-to-image teachers.")
        if not self.digits_teacher:
            needs_images = METHODS[self.method].trains_on_images or self.gan_weight > 0
            if needs_images and not self.data and (cache is None or cache.images is None):
                raise ValueError(f"--method {self.method} (with these options) trains on images: pass --data FOLDER (images + .txt captions)"
                                 f"{' or a cache of images (onestep-train cache --data); this cache holds prompts only' if self.cache else ''}.")
            if not self.prompts and not self.data and not self.cache:
                raise ValueError("a text-to-image teacher needs --prompts FILE (one prompt per line) or --data FOLDER.")

    def _check_output_dir(self) -> None:
        out = self.output_dir
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"--output-dir {out} is a file; choose a folder (new or empty) for the run.")
        run_file = os.path.join(out, RUN_FILE)
        if os.path.isfile(run_file):
            previous = _read_json(run_file, "--output-dir")
            if not self.resume:
                raise ValueError(f"--output-dir {out} holds another run; pass --resume latest to continue it, or choose a new --output-dir.")
            diff = ", ".join(f"{flag(k)} {theirs!r} -> {ours!r}" for k, (theirs, ours) in self.changed_options(previous).items())
            if diff:
                raise ValueError(f"--resume: the run in {out} was started with other options ({diff}).")
            if self.resume != "latest" and not os.path.isfile(os.path.join(self.resume, "trainer_state.json")):
                raise ValueError(f"--resume {self.resume}: not a checkpoint folder of this trainer (no trainer_state.json).")
        elif self.resume:
            raise ValueError(f"--resume {self.resume}: --output-dir {out} holds no run to continue.")
        elif os.path.isdir(out) and os.listdir(out):
            raise ValueError(f"--output-dir {out} is not empty and holds no run of this trainer; choose a new or empty folder.")
        parent = os.path.dirname(os.path.abspath(out))
        if not os.access(parent if not os.path.isdir(out) else out, os.W_OK):
            raise ValueError(f"--output-dir {out}: cannot write there.")

    def _check_teacher(self) -> None:
        source = teacher_folder(self.teacher)
        if source == "digits":
            return
        if os.path.exists(source):
            if not os.path.isfile(os.path.join(source, "model_index.json")):
                raise ValueError(f"--teacher {source} is not a diffusers pipeline folder (it has no model_index.json).")
            scheduler = os.path.join(source, "scheduler", "scheduler_config.json")
            if METHODS[self.method].flow_teacher and os.path.isfile(scheduler) and _is_vp_config(_read_json(scheduler, "--teacher")):
                raise ValueError(f"--method {self.method} needs a flow teacher (time 1 = noise, velocity prediction); {source} is a VP (DDPM-family) model.")
        elif os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") != 1:
            raise ValueError(f"--teacher {source!r} is neither 'digits', {', '.join(repr(n) for n in TEXT_TEACHERS)}, a pipeline folder, nor a Hub id 'org/name'.")


FAKE_SCORE = ("dmd2", "tdm", "sid", "scm", "reward", "phased-dmd", "hyper-sd")  # the methods that train a fake score (scm, hyper-sd: with --dmd-weight)
# The methods an option applies to (an option not listed applies to every method): --help lists the options by these
# sets (``--method M --help`` shows M's alone), config.yaml holds a run's own, and an option set for another method is
# refused.
STUDENT_TIMES = ("dmd2", "tdm", "sid", "scm", "piflow", "reward", "phased-dmd")  # methods whose losses run the student at its own times
OPTION_METHODS = {
    "fake_learning_rate": FAKE_SCORE, "fake_updates": FAKE_SCORE, "fake_lora_rank": FAKE_SCORE,
    "divergence": ("dmd2", "tdm", "sid", "reward"), "gan_weight": ("dmd2", "tdm", "sid", "reward"), "gan_max_time": ("dmd2", "tdm", "sid", "reward"),
    "sid_alpha": ("sid",), "lsg_scale": ("sid",), "uni_instruct": ("sid",), "diff_instruct": ("dmd2",),
    "phases": ("consistency", "phased-dmd", "hyper-sd"),
    "ode_steps": ("consistency", "meanflow", "flowmap", "reflow", "progressive", "twinflow", "tdd", "hyper-sd"),
    "loss": ("consistency", "reflow", "tdd", "hyper-sd"),
    "uncond_fraction": ("tdd",), "student_guidance": ("tdd",), "student_prediction": ("progressive",),
    "coupling_count": ("reflow",), "coupling_dir": ("reflow",),
    "target_ema": ("consistency", "meanflow", "flowmap", "twinflow", "tdd", "hyper-sd"),
    "target": ("meanflow", "flowmap", "reflow", "twinflow"),
    "source": ("meanflow", "twinflow"),
    "jump_fraction": ("flowmap",),
    "equal_fraction": ("meanflow", "flowmap", "twinflow"), "endpoint_fraction": ("meanflow", "flowmap", "twinflow"),
    "logit_mean": ("meanflow", "flowmap", "scm", "twinflow"), "logit_std": ("meanflow", "flowmap", "scm", "twinflow"),
    "rectify_weight": ("twinflow",),
    "dmd_weight": ("scm", "hyper-sd"),
    "timesteps": STUDENT_TIMES, "sigmas": STUDENT_TIMES,
    "tangent_time_step": ("scm", "meanflow", "flowmap", "twinflow"),
    "tangent_warmup": ("scm",),
    "policy": ("piflow",), "policy_components": ("piflow",), "policy_substeps": ("piflow",),
    "student": ("reward",), "reward": ("reward",), "reward_weight": ("reward",), "regularizer": ("reward",), "reward_noise": ("reward",),
}


EIGHT_STEPS = ("consistency", "hyper-sd", "tdd", "progressive")  # trained on a grid of jumps: 8-step students as the published LoRAs


def halves_to(start: int, end: int) -> bool:
    """Whether ``start`` steps (or segments) halve stage by stage down to ``end``: ``start = end * 2^k``, ``k >= 0``."""
    ratio = start // end
    return start % end == 0 and ratio >= 1 and ratio & (ratio - 1) == 0


def max_steps(method: str) -> int:
    """The most student steps ``--method`` trains: 8 for the consistency family, else 4."""
    return 8 if method in EIGHT_STEPS else 4


def applies(name: str, method: str) -> bool:
    """Whether option ``name`` applies to ``method``."""
    return method in OPTION_METHODS.get(name, (method,))


def check_lr_step_rules(text: str) -> None:
    """Refuse a malformed ``--lr-step-rules`` (diffusers' ``step_rules``: ``m1:u1,m2:u2,...,m``: the multiplier
    ``m1`` of the learning rate before update ``u1``, ``m2`` before ``u2``, ..., ``m`` from the last ``u`` on)."""
    *held, last = text.split(",")
    try:
        pairs = [(float(m), int(u)) for m, u in (rule.split(":") for rule in held)]
        multipliers = [m for m, _ in pairs] + [float(last)]
    except ValueError:
        raise ValueError(f"--lr-step-rules {text!r}: write multiplier:update pairs and a last multiplier, e.g. 1:3000,0.2.") from None
    updates = [u for _, u in pairs]
    if not updates or updates[0] <= 0 or any(b <= a for a, b in zip(updates, updates[1:])):
        raise ValueError(f"--lr-step-rules {text!r}: the updates must be positive and increasing, with at least one multiplier:update pair.")
    if min(multipliers) < 0:
        raise ValueError(f"--lr-step-rules {text!r}: the multipliers must be 0 or positive.")


def option_groups() -> dict[tuple[str, ...], list[str]]:
    """The method-specific options grouped by the methods they apply to (in field order)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for f in dataclasses.fields(DistillConfig):
        if f.name in OPTION_METHODS:
            groups.setdefault(OPTION_METHODS[f.name], []).append(f.name)
    return groups


def _defaults() -> dict:
    """Every option's default."""
    return {f.name: f.default for f in dataclasses.fields(DistillConfig)}


REWARDS = ("digits", "clip:FOLDER", "MODULE:NAME")


def check_reward_spec(spec: str) -> None:
    """Refuse a malformed ``--reward`` before anything loads (the module is imported later)."""
    if spec == "digits":
        return
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(f"--reward {spec!r} is not one of: {', '.join(REWARDS)}.")
    if kind == "clip" and not os.path.isdir(rest):
        raise ValueError(f"--reward {spec}: {rest} is not a folder (a transformers CLIP model folder).")


def _is_vp_config(config: dict) -> bool:
    """A stock scheduler config of a VP (DDPM-family) model: it has a beta schedule and is not TrigFlow (our
    schedulers name their ``time_type``)."""
    if "time_type" in config:
        return config["time_type"] == "vp"
    return any(k in config for k in ("beta_schedule", "trained_betas")) and config.get("prediction_type") != "trigflow"


def is_digits_pipeline(folder: str, what: str) -> bool:
    """Whether ``folder`` is a digits pipeline folder: its ``model_index.json`` names ``DigitsPipeline`` (bare, or as
    ``[module, name]`` with a ``pipeline.py``); ``what`` names the folder in a read error."""
    index = os.path.join(folder, "model_index.json")
    return os.path.isfile(index) and "DigitsPipeline" in json.dumps(_read_json(index, what).get("_class_name"))


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{what}: cannot read {path} ({error}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} does not hold a JSON object.")
    return data


# ---------------------------------------------------------------------------------------------- config files
def read_config_file(path: str) -> dict:
    """Options from a YAML or JSON file (keys as field names or flags: ``num_steps``, ``num-steps``, ``--num-steps``)."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    data = _parse(path, text)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of options (e.g. `method: dmd2`), not {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"did you mean {close[0]}?" if close else "see onestep-train distill --help"
            raise ValueError(f"--config {path}: unknown option {key!r} ({hint}).")
        out[name] = _typed(value, fields[name].type, f"--config {path}: {key}")
    return out


def _parse(path: str, text: str):
    """The file's content (JSON for ``.json``, else YAML); a syntax error names its line and column."""
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config {path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg}).") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"--config {path}{where}: not valid YAML ({problem}).") from None


def _typed(value, kind: str, what: str):
    """``value`` as the field's type; numbers may be written as strings (YAML 1.1 reads ``1e-4`` as text)."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
    elif kind == "str":
        if isinstance(value, str):
            return value
    elif not isinstance(value, bool):
        try:
            number = float(value) if kind == "float" else int(value)
            if kind == "float" or float(value) == number:
                return number
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{what} must be {'a number' if kind == 'float' else 'an integer' if kind == 'int' else kind}, got {value!r}.")


def free_output_dir(out: str) -> str:
    """``out`` when it holds no run, else the first of ``out-2``, ``out-3``, ... that is missing or empty (the folder of
    a run that repeats another's config file)."""
    if not os.path.isfile(os.path.join(out, RUN_FILE)):
        return out
    base, n = out.rstrip("/" + os.sep), 2
    while os.path.exists(f"{base}-{n}") and not (os.path.isdir(f"{base}-{n}") and not os.listdir(f"{base}-{n}")):
        n += 1
    return f"{base}-{n}"


def resolve(flags: dict, config_file: str | None = None) -> DistillConfig:
    """Defaults, then the config file, then the flags given on the command line (``flags`` holds only those)."""
    values = read_config_file(config_file) if config_file else {}
    values.update(flags)
    return DistillConfig(**values)


def config_yaml(config: DistillConfig) -> str:
    """The resolved options as YAML, in field order (written as ``config.yaml`` in the run folder)."""
    import yaml

    options = config.to_dict() | {"resume": ""}  # a repeated run starts afresh (in a new folder: see cli._config)
    common = {k: v for k, v in options.items() if k not in OPTION_METHODS}
    own = {k: v for k, v in options.items() if k in OPTION_METHODS and applies(k, config.method)}
    return ("# onestep-train distill --config config.yaml repeats this run, in a new folder (NAME-2, ...) unless --output-dir is given\n"
            + yaml.safe_dump(common, sort_keys=False)
            + (f"# options of --method {config.method} (other methods' options are left out)\n" + yaml.safe_dump(own, sort_keys=False) if own else ""))


def _looks_like_hub_id(text: str) -> bool:
    """``name`` or ``org/name``: what a Hub dataset id looks like (not a path)."""
    return not text.startswith((".", "/", "~")) and text.count("/") <= 1 and "\\" not in text and not os.path.splitext(text)[1]
