# Written by onestep-pipelines: lets DiffusionPipeline.from_pretrained(..., trust_remote_code=True) load this
# student in an interpreter that has not imported the package. Requires `pip install onestep-pipelines`.
from onestep_pipelines.pipelines import DigitsPipeline  # noqa: F401
