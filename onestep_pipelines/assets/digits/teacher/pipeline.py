# Written by onestep-pipelines: lets DiffusionPipeline.from_pretrained(..., trust_remote_code=True) load this
# student in an interpreter that has not imported the package. Requires onestep-pipelines, which is not on PyPI:
# pip install "git+https://github.com/onestep-pipelines/onestep-pipelines"  (or `pip install .` in a clone of the repository)
from onestep_pipelines.pipelines import DigitsPipeline  # noqa: F401
