"""The pipeline's stages: one module per stage (cls, cam, pseudo, seg, cycle, eval), each
declaring itself (``pmm_jax.stages.stage.Stage``), and the planner that runs them
(``pmm_jax.stages.planner``: plan, run_stage, damaged_input, completed). docs/design.md.
"""

from pmm_jax.files.workdir import parse_stages
from pmm_jax.stages.planner import (ORDER, DamagedInputError, StageError, StageInputError,
                                    StageOutputError, StaleStageError, check_inputs,
                                    completed, damaged_input, headline, needs, plan, run_stage)

__all__ = ["ORDER", "DamagedInputError", "StageError", "StageInputError", "StageOutputError",
           "StaleStageError", "check_inputs", "completed", "damaged_input", "headline", "needs",
           "parse_stages", "plan", "run_stage"]
