"""diffusers schedulers (``SchedulerMixin`` + ``ConfigMixin``) over the sampling core."""

from .scheduling_consistency import ConsistencyScheduler
from .scheduling_flow_map import FlowMapScheduler
from .scheduling_policy import PolicyScheduler
from .scheduling_tdm import TDMScheduler
from .scheduling_utils import FewStepSchedulerOutput

__all__ = ["ConsistencyScheduler", "FewStepSchedulerOutput", "FlowMapScheduler", "PolicyScheduler", "TDMScheduler"]
