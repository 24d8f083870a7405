"""diffusers' own scheduler tests, run against our schedulers: the drop-in contract.

Set ``DIFFUSERS_DIR`` to a huggingface/diffusers source checkout (its ``tests/`` folder is imported from there, never
copied); without it these tests are skipped, like the ComfyUI server tests. The checkout's
``tests/schedulers/test_scheduler_lcm.py``, ``test_scheduler_tcd.py`` (both built on ``SchedulerCommonTest``) and
``test_scheduler_flow_map_euler_discrete.py`` run with our classes in place of the stock ones. Every config key we
translate is listed below; nothing else differs.

- ``LCMScheduler(**config)`` -> ``ConsistencyScheduler(**config, timestep_preset="lcm", lcm_boundary_condition=True)``
- ``TCDScheduler(**config)`` -> ``ConsistencyScheduler(**config, timestep_preset="tcd", set_alpha_to_one=False,
  gamma_from_eta=True)``
- ``FlowMapEulerDiscreteScheduler(**config)`` -> ``FlowMapScheduler(**config)``

Refused on purpose, with a clear error (README lists them): ``trained_betas`` whose length is not
``num_train_timesteps`` (``test_trained_betas`` passes two betas for a 1000-step grid; stock schedulers accept them
and fail later). The overrides below assert that refusal instead of the stock behaviour.
"""

import importlib.util
import os
import sys

import pytest

from onestep_pipelines import ConsistencyScheduler, FlowMapScheduler

DIFFUSERS_DIR = os.environ.get("DIFFUSERS_DIR")
LCM = {"timestep_preset": "lcm", "lcm_boundary_condition": True}
TCD = {"timestep_preset": "tcd", "set_alpha_to_one": False, "gamma_from_eta": True}
PACKAGE = "diffusers_checkout_tests"


def load_stock_test(name: str):
    """``tests/schedulers/<name>.py`` of the diffusers checkout, imported as a module of a private package (its
    relative imports of ``..testing_utils`` resolve inside the checkout)."""
    tests = os.path.join(DIFFUSERS_DIR, "tests")
    if not os.path.isfile(os.path.join(tests, "schedulers", f"{name}.py")):
        raise FileNotFoundError(f"DIFFUSERS_DIR={DIFFUSERS_DIR} has no tests/schedulers/{name}.py: point it at a diffusers source checkout.")
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(tests, "__init__.py"), submodule_search_locations=[tests])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.schedulers.{name}")


def translated(stock_test, our_class, extra: dict):
    """A subclass of a SchedulerCommonTest-based stock test that builds ``our_class`` with ``extra`` config keys."""

    class Contract(stock_test):
        scheduler_classes = (our_class,)

        def get_scheduler_config(self, **kwargs):
            return {**super().get_scheduler_config(**kwargs), **extra}

        def test_trained_betas(self):  # refused: one beta per training timestep
            with self.assertRaisesRegex(ValueError, "trained_betas must hold num_train_timesteps=1000 values"):
                super().test_trained_betas()

    return Contract


if DIFFUSERS_DIR:
    TestLCMSchedulerContract = translated(load_stock_test("test_scheduler_lcm").LCMSchedulerTest, ConsistencyScheduler, LCM)
    TestTCDSchedulerContract = translated(load_stock_test("test_scheduler_tcd").TCDSchedulerTest, ConsistencyScheduler, TCD)

    class TestFlowMapEulerDiscreteContract(load_stock_test("test_scheduler_flow_map_euler_discrete").FlowMapEulerDiscreteSchedulerTest):
        scheduler_class = FlowMapScheduler
else:

    def test_diffusers_scheduler_tests_need_a_checkout():
        pytest.skip("set DIFFUSERS_DIR to a huggingface/diffusers source checkout to run its scheduler tests on our schedulers")
