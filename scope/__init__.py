"""SCOPE: training-free Cache / Predict / Recompute acceleration of autoregressive video
diffusion, applied to a model from outside through a hook on its block stack.

Model-agnostic; imports torch only. See docs/ARCHITECTURE.md section 2.2.
"""

from scope.config import (AccelConfig, FBCacheConfig, FlowCacheConfig, NoneConfig, ScopeConfig,
                          TaylorSeerConfig, TeaCacheConfig, load_config, make_config)
from scope.executor import CallPlan, StageExecutor, make_run_fn
from scope.hooks import Accelerator, HookRegistry, StackAdapter, apply_accel, call_original, remove_accel
from scope.state import CallContext, StateStore, UnitKey
from scope.stats import RequestStats

__all__ = [
    "AccelConfig", "Accelerator", "CallContext", "CallPlan", "FBCacheConfig", "FlowCacheConfig",
    "HookRegistry", "NoneConfig", "RequestStats", "ScopeConfig", "StackAdapter", "StageExecutor",
    "StateStore", "TaylorSeerConfig", "TeaCacheConfig", "UnitKey", "apply_accel", "call_original",
    "load_config", "make_config", "make_run_fn", "remove_accel",
]
