"""Distillation methods, one file each, and their registry.

``METHODS`` names each method's module and class with its one-line summary and the choices of its method-specific
flags. It imports nothing heavy, so ``onestep-train`` lists and validates methods before torch or diffusers load;
:func:`get_method` imports the class. A method owns its losses and its auxiliary networks (fake score,
discriminator, target network) and their optimizers; the trainer owns the student, its optimizer, EMA, checkpoints
and logging (see :mod:`.base`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MethodSpec:
    """Where a method lives and what its flags accept.

    Args:
        module: file in this folder; cls: class in it.
        summary: one line for ``--help``.
        targets: ``--target`` choices (the first is the default); sources: ``--source`` choices.
        flow_teacher: the method needs a flow (velocity) teacher.
        trains_on_images: its loss takes real images (``--data`` for text-to-image teachers); the GAN head of the
            distribution-matching methods adds them to any method (``--gan-weight``).
        papers: ``(citation, arXiv id)`` of the papers it implements (named in the students' model cards).
        variants: ``{option: (name, papers)}``: a boolean option that makes it another published method, recorded
            under that name in its students (metadata, card) with that method's papers.
    """

    module: str
    cls: str
    summary: str
    targets: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    flow_teacher: bool = False
    trains_on_images: bool = False
    papers: tuple[tuple[str, str], ...] = ()
    variants: dict = field(default_factory=dict)


METHODS: dict[str, MethodSpec] = {
    "dmd2": MethodSpec("dmd2", "DMD2", "distribution matching (DMD2), f-divergence weighting, optional GAN head",
                       papers=(("Yin et al. 2024, Improved Distribution Matching Distillation for Fast Image Synthesis", "2405.14867"),),
                       variants={"diff_instruct": ("diff-instruct", (("Luo et al. 2023, Diff-Instruct: A Universal Approach for Transferring Knowledge From "
                                                                      "Pre-trained Diffusion Models", "2305.18455"),))}),
    "consistency": MethodSpec("consistency", "ConsistencyDistillation", "consistency distillation: LCM, or phased (PCM) with --phases",
                              trains_on_images=True,
                              papers=(("Luo et al. 2023, Latent Consistency Models", "2310.04378"), ("Wang et al. 2024, Phased Consistency Models", "2405.18407"))),
    "tdm": MethodSpec("tdm", "TDM", "trajectory distribution matching; sampled by TDMScheduler",
                      papers=(("Luo et al. 2025, Learning Few-Step Diffusion Models by Trajectory Distribution Matching", "2503.06674"),)),
    "sid": MethodSpec("sid", "SiD", "score identity distillation (SiD; LSG guidance of the fake score; GAN head = SiDA)",
                      papers=(("Zhou et al. 2024, Score identity Distillation", "2404.04057"),),
                      variants={"uni_instruct": ("uni-instruct", (("Wang et al. 2025, Uni-Instruct: One-step Diffusion Model through Unified Diffusion "
                                                                   "Divergence Instruction", "2505.20755"),))}),
    "scm": MethodSpec("scm", "SCM", "continuous-time consistency in TrigFlow (sCM): JVP tangent, normalised and warmed up, learned weighting",
                      flow_teacher=True, trains_on_images=True, papers=(("Lu & Song 2024, Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", "2410.11081"),
                                                 ("Zheng et al. 2025, Large Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency", "2510.08431"))),
    "meanflow": MethodSpec("meanflow", "MeanFlow", "MeanFlow average velocities (SplitMeanFlow, JVP or shortcut target); any step count",
                           targets=("split", "jvp", "shortcut"), sources=("teacher", "data"), flow_teacher=True,
                           trains_on_images=True, papers=(("Geng et al. 2025, Mean Flows for One-step Generative Modeling", "2505.13447"),
                                   ("Frans et al. 2024, One Step Diffusion via Shortcut Models (--target shortcut)", "2410.12557"))),
    "flowmap": MethodSpec("flowmap", "FlowMap", "flow-map distillation (Align Your Flow); any step count",
                          targets=("euler", "jvp", "shortcut"), sources=("teacher",), flow_teacher=True,
                          trains_on_images=True, papers=(("Sabour et al. 2025, Align Your Flow: Scaling Continuous-Time Flow Map Distillation", "2506.14603"),)),
    "reflow": MethodSpec("reflow", "Reflow", "reflow (rectified flow on the teacher's cached ODE couplings; --target distill: InstaFlow's 1-step stage)",
                         targets=("flow", "distill"), flow_teacher=True,
                         papers=(("Liu et al. 2022, Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow", "2209.03003"),
                                 ("Liu et al. 2023, InstaFlow: One Step is Enough for High-Quality Diffusion-Based Text-to-Image Generation", "2309.06380"),
                                 ("Lee et al. 2024, Improving the Training of Rectified Flows", "2405.20320"))),
    "piflow": MethodSpec("piflow", "PiFlow", "pi-Flow policy students (GMFlow or DX policy integrated in substeps; imitation distillation, pi-ID)",
                         flow_teacher=True,
                         papers=(("Chen et al. 2025, pi-Flow: Policy-Based Few-Step Generation via Imitation Distillation", "2510.14974"),
                                 ("Chen et al. 2025, Gaussian Mixture Flow Matching Models", "2504.05304"))),
    "progressive": MethodSpec("progressive", "ProgressiveDistillation", "progressive distillation: halve the DDIM steps stage by stage (--ode-steps -> --num-steps)",
                              trains_on_images=True, papers=(("Salimans & Ho 2022, Progressive Distillation for Fast Sampling of Diffusion Models", "2202.00512"),)),
    "phased-dmd": MethodSpec("phased_dmd", "PhasedDMD", "Phased DMD: distribution matching per phase of the noise range, score matching within each subinterval (--phases)",
                             papers=(("Fan et al. 2025, Phased DMD: Few-step Distribution Matching Distillation via Score Matching within Subintervals", "2510.27684"),)),
    "twinflow": MethodSpec("twinflow", "TwinFlow", "TwinFlow: one network, its negative-time twin learns its own samples' flow (no fake score, no "
                           "discriminator); any step count",
                           targets=("split", "jvp", "shortcut"), sources=("teacher", "data"), flow_teacher=True,
                           trains_on_images=True,
                           papers=(("Cheng et al. 2025, TwinFlow: Realizing One-step Generation on Large Models with Self-adversarial Flows", "2512.05150"),)),
    "tdd": MethodSpec("tdd", "TDD", "target-driven distillation: consistency to selected target times of 1x-2x --num-steps schedules, "
                      "decoupled guidance (CFG works on the student)",
                      trains_on_images=True, papers=(("Wang et al. 2024, TDD: Target-Driven Distillation: Consistency Distillation with Target Timestep Selection and "
                               "Decoupled Guidance", "2409.01347"),)),
    "hyper-sd": MethodSpec("hypersd", "HyperSD", "Hyper-SD: trajectory segmented consistency distillation, segments halved stage by stage "
                           "(--phases 8 -> --num-steps), optional DMD stage (--dmd-weight)",
                           trains_on_images=True, papers=(("Ren et al. 2024, Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image Synthesis", "2404.13686"),)),
    "reward": MethodSpec("reward", "RewardTuning", "reward post-training of a --student folder, regularised by DMD against the teacher (--reward: a plugin scorer)",
                         papers=(("Luo et al. 2024, Diff-Instruct*: Towards Human-Preferred One-step Text-to-image Generative Models", "2410.20898"),
                                 ("Li et al. 2024, Reward Guided Latent Consistency Distillation", "2403.11027"))),
}


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN or infinite; the run stops and names the step and the last good checkpoint."""


def check_method_name(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"--method {name!r} is unknown; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


def recorded_name(config) -> str:
    """The method a run's students name: ``--method``, or the published variant one of its options selects."""
    variants = METHODS[config.method].variants
    return next((name for option, (name, _) in variants.items() if getattr(config, option)), config.method)


def papers(name: str) -> tuple[tuple[str, str], ...]:
    """The papers of a method or of a variant's name (empty for names the trainer does not know)."""
    for key, spec in METHODS.items():
        if key == name:
            return spec.papers
        for variant, cited in spec.variants.values():
            if variant == name:
                return spec.papers + cited
    return ()


def get_method(name: str) -> type:
    """The class of method ``name`` (imports its module)."""
    spec = check_method_name(name)
    cls = getattr(importlib.import_module(f".{spec.module}", __name__), spec.cls)
    if cls.name != name:
        raise RuntimeError(f"the registry names {spec.module}.{spec.cls} for {name!r}, but the class calls itself {cls.name!r}.")
    return cls
