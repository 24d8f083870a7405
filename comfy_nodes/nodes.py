"""The node pack (ComfyUI V3 ``comfy_api`` schema). Each node's ``execute`` delegates to :mod:`.adapters` or
:mod:`.bridge`; errors are raised as ValueError with the reason (:func:`.errors.fail`), which ComfyUI reports on the node.

ComfyUI imports this module and builds every schema at start, so it imports only what the schemas need (the sampling
core's preset names: no diffusers, transformers or peft); :mod:`.adapters` and :mod:`.bridge`, and through them the
library's LoRA, metadata and pipeline code, are imported by the first ``execute`` that needs them."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

from onestep_pipelines.benchmark import TEXT_STUDENT_LORAS, TEXT_TEACHERS  # names and folders only: the package's __init__ imports nothing heavy
from onestep_pipelines.sampling import PRESETS, parse_timesteps

from .errors import fail

CATEGORY = "sampling/onestep"
PRESET_OPTIONS = [p for p in PRESETS if p != "uniform"] + ["custom"]
TIMESTEP_RANGE = "integers in [0, 999] for SD 1.5 / SDXL; values in (0, 1000] (sigma x 1000) for flow models"


class ConsistencySampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneStepConsistencySampler",
            display_name="Consistency Sampler (onestep)",
            category=CATEGORY,
            description="Few-step consistency sampling with a gamma knob (LCM, TCD, DMD2, sCM students); SD1.5/SDXL (epsilon, v) and flow models.",
            inputs=[
                io.Float.Input("gamma", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Re-noising between steps: 1 = LCM / DMD2 (fresh noise), 0.3 = TCD, 0 = deterministic DDIM / Euler."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, gamma) -> io.NodeOutput:
        from . import adapters

        return io.NodeOutput(adapters.consistency_sampler(gamma))


class TDMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneStepTDMSampler",
            display_name="TDM Sampler (onestep)",
            category=CATEGORY,
            description="Sampler of Trajectory Distribution Matching students: deterministic moves between segment boundaries (pair with the 'tdm' sigmas preset).",
            inputs=[],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        from . import adapters

        return io.NodeOutput(adapters.consistency_sampler(0.0))


class FlowMapSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneStepFlowMapSampler",
            display_name="Flow-Map Sampler (onestep)",
            category=CATEGORY,
            description="MeanFlow / flow-map students: every model call gets the target time r and the sample jumps there. Needs a MODEL from 'Flow-Map r-Conditioning (onestep)'.",
            inputs=[
                io.Float.Input("gamma", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="0 = jump to the next sigma; > 0 jumps further towards data and re-noises (stochastic flow-map sampling)."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, gamma) -> io.NodeOutput:
        from . import adapters

        return io.NodeOutput(adapters.flow_map_sampler(gamma))


class FlowMapConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneStepFlowMapConditioning",
            display_name="Flow-Map r-Conditioning (onestep)",
            category=CATEGORY,
            description="Adds a student's second-time embedding (r_embedder.safetensors, in models/loras) so the model takes the r sent by the flow-map sampler.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("r_embedder", options=folder_paths.get_filename_list("loras"),
                               tooltip="The r_embedder.safetensors written next to the student's LoRA (copy it into models/loras)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, r_embedder) -> io.NodeOutput:
        from . import adapters

        path = folder_paths.get_full_path_or_raise("loras", r_embedder)
        try:
            return io.NodeOutput(adapters.patch_r_conditioning(model, adapters.r_embedder_from_file(path)))
        except ValueError as error:
            raise fail(f"r_embedder {r_embedder}", error) from None


class FewStepSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneStepSigmas",
            display_name="Few-Step Sigmas (onestep)",
            category=CATEGORY,
            description="Few-step schedules (LCM, TCD, DMD2, TDM, rCM, sCM, trailing) or a custom timestep list, converted with the model's own model_sampling.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("preset", options=PRESET_OPTIONS, default="trailing",
                               tooltip="lcm/tcd: 50-step LCM grid; dmd2: 999,749,499,249; tdm: uniform boundaries; rcm/scm: TrigFlow times; "
                                       "trailing: evenly spaced from pure noise; custom: the list below."),
                io.Int.Input("steps", default=4, min=1, max=1000, tooltip="Model evaluations (ignored for custom)."),
                io.String.Input("timesteps", default="999,749,499,249", tooltip=f"custom only: comma-separated, strictly decreasing training timesteps, {TIMESTEP_RANGE}."),
                io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Flow models: 0 keeps the model's own shift; > 0 replaces it (SD3 uses 3)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip="< 1 keeps the last steps of a longer schedule (img2img)."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, preset, steps, timesteps, shift, denoise) -> io.NodeOutput:
        from . import adapters

        try:
            custom = parse_timesteps(timesteps) if preset == "custom" else None
            return io.NodeOutput(adapters.model_sigmas(model, steps, "trailing" if custom else preset, custom, shift, denoise))
        except ValueError as error:
            where = "timesteps" if preset == "custom" else f"preset {preset!r}, steps {steps}" + (f", denoise {denoise:g}" if denoise != 1 else "")
            raise fail(where, error) from None


class StudentLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneStepLoraLoader",
            display_name="Student LoRA Loader (onestep)",
            category=CATEGORY,
            description="Loads a onestep student LoRA or any diffusers / peft / kohya LoRA; every module must map (or allow_partial). "
                        "With sampling metadata in the file, also outputs the matching SAMPLER and SIGMAS.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras")),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Boolean.Input("allow_partial", default=False, tooltip="Load even when some LoRA modules match nothing in this model."),
                io.Int.Input("fallback_steps", default=4, min=1, max=100, tooltip="Steps of the SIGMAS output when the file records no sampling."),
            ],
            outputs=[io.Model.Output(), io.Sampler.Output(), io.Sigmas.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength, allow_partial, fallback_steps) -> io.NodeOutput:
        from . import adapters

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        try:
            patched, metadata, report = adapters.load_lora(model, path, strength, allow_partial)
            sampler, sigmas = adapters.student_sampling(patched, metadata, fallback_steps)
        except ValueError as error:
            raise fail("", error) from None
        return io.NodeOutput(patched, sampler, sigmas, f"{report}; {adapters.describe(metadata)}")


def _diffusers_folders() -> list[str]:
    """The folders of models/diffusers with a model_index.json, then the shipped teachers (by name) this install holds."""
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            found += [name for name in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, name, "model_index.json"))]
    return found + [name for name, path in TEXT_TEACHERS.items() if name not in found and os.path.isfile(os.path.join(path, "model_index.json"))]


def _shipped_loras() -> list[str]:
    """The LoRA students shipped with the package (by name) that this install holds."""
    return [name for name, path in TEXT_STUDENT_LORAS.items() if os.path.isfile(path)]


class DiffusersStudent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneStepDiffusersStudent",
            display_name="Diffusers Student (onestep)",
            category=CATEGORY,
            description="Generates with a diffusers-format student folder (models/diffusers/<name>) using the scheduler, steps and guidance recorded in it; "
                        "or with a LoRA student applied to a teacher folder or a shipped teacher (text-digits-sd), sampling as the LoRA records.",
            inputs=[
                io.Combo.Input("student", options=_diffusers_folders(),
                               tooltip="A folder in models/diffusers with model_index.json, or a teacher shipped with onestep-pipelines (text-digits-sd)."),
                io.String.Input("prompt", default="", multiline=True, tooltip="Text-to-image students."),
                io.String.Input("class_labels", default="0,1,2,3,4,5,6,7,8,9", tooltip="Class-conditional students (digits): comma-separated labels."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=0, min=0, max=1000, tooltip="0 = the student's recorded steps."),
                io.Float.Input("guidance", default=-1.0, min=-1.0, max=30.0, step=0.1, tooltip="-1 = the student's recorded guidance."),
                io.Int.Input("width", default=0, min=0, max=8192, step=8, tooltip="0 = the pipeline's default."),
                io.Int.Input("height", default=0, min=0, max=8192, step=8, tooltip="0 = the pipeline's default."),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("substeps", default=0, min=0, max=4096, optional=True,
                             tooltip="pi-Flow policy students: Euler substeps of the policy per step (0 = recorded); no extra model calls."),
                io.Combo.Input("lora", options=["none", *_shipped_loras(), *folder_paths.get_filename_list("loras")], default="none", optional=True,
                               tooltip="A LoRA student (models/loras, or text-digits-sd-lcm-lora shipped for text-digits-sd) of the student above, "
                                       "which is then its teacher: loaded as the few-step pipeline with the LoRA's scheduler, steps and guidance."),
                io.Float.Input("lora_strength", default=1.0, min=-10.0, max=10.0, step=0.01, optional=True,
                               tooltip="Scale of the LoRA (1 = as trained); unused without a lora."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, student, prompt, class_labels, seed, steps, guidance, width, height, batch_size, substeps=0, lora="none",
                lora_strength=1.0) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        from . import bridge

        try:
            lora_path = None if lora in (None, "", "none") else TEXT_STUDENT_LORAS.get(lora) or folder_paths.get_full_path_or_raise("loras", lora)
            pipe = bridge.load_pipeline(_folder(student), comfy.model_management.get_torch_device(), lora=lora_path,
                                        lora_strength=1.0 if lora_strength is None else lora_strength, name=student)
        except ValueError as error:
            raise fail("", error) from None
        progress = comfy.utils.ProgressBar(max(int(steps), 1))

        def on_step(done: int, total: int) -> None:  # ComfyUI's progress bar, and Cancel (/interrupt) between steps
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(done, total)

        try:
            images = bridge.generate(pipe, prompt, class_labels, seed, steps, guidance, width, height, batch_size, on_step=on_step,
                                     substeps=substeps or 0)
        except ValueError as error:
            raise fail("prompt / class_labels / steps / substeps", error) from None
        return io.NodeOutput(images)


def _folder(name: str) -> str:
    """The folder of ``student``: a folder of models/diffusers, else a shipped teacher of that name."""
    for root in folder_paths.get_folder_paths("diffusers"):
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return path
    if os.path.isfile(os.path.join(TEXT_TEACHERS.get(name, ""), "model_index.json")):
        return TEXT_TEACHERS[name]
    raise ValueError(f"student {name!r}: no such folder with a model_index.json in models/diffusers ({folder_paths.get_folder_paths('diffusers')[:2]}) "
                     f"and no shipped teacher of that name ({', '.join(TEXT_TEACHERS)}).")


NODES = [ConsistencySampler, TDMSampler, FlowMapSampler, FlowMapConditioning, FewStepSigmas, StudentLoraLoader, DiffusersStudent]


class OneStepExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES

