"""fedprompt: federated prompt tuning for frozen JAX/Flax language models.

Frozen backbones stay put; only soft prompts or per-layer prefixes are trained and moved.
"""

from fedprompt.backbones.backbone import Backbone, BackboneOutput
from fedprompt.backbones.loading import load_backbone
from fedprompt.client.local import (
    StepMetrics,
    compiled_memory,
    init_trainable,
    iterate_batches,
    local_train,
    make_eval_step,
    make_loss_fn,
    make_train_step,
)
from fedprompt.client.federated import ClientResult, make_client_update
from fedprompt.client.program import ClientProgram, gradient_program
from fedprompt.config import RunConfig
from fedprompt.errors import FedPromptError, RunFolderError
from fedprompt.federation.keys import KeySchedule
from fedprompt.federation.plan import FederationPlan, build_plan, make_plan
from fedprompt.federation.records import RoundRecord
from fedprompt.prompts import Prefix, PromptConfig, SoftPrompt, fold_prompt, init_prompt, materialize
from fedprompt.server.aggregators import Aggregation, weighted_mean
from fedprompt.server.algorithms import Algorithm, ServerState
from fedprompt.server.rounds import AggregateStage, RoundState, ServerRound, mean_stage, receive_updates
from fedprompt.simulation.run import SimulationResult, run, simulate
from fedprompt.tasks import CausalLM, SequenceClassification
from fedprompt.wire.artifact import PromptArtifact, load_prompt, save_prompt

__version__ = "0.1.0"

__all__ = [
    "AggregateStage",
    "Aggregation",
    "Algorithm",
    "Backbone",
    "ClientProgram",
    "ClientResult",
    "FederationPlan",
    "KeySchedule",
    "RoundRecord",
    "RoundState",
    "RunConfig",
    "ServerRound",
    "ServerState",
    "SimulationResult",
    "build_plan",
    "gradient_program",
    "make_client_update",
    "make_plan",
    "mean_stage",
    "receive_updates",
    "weighted_mean",
    "run",
    "simulate",
    "BackboneOutput",
    "CausalLM",
    "FedPromptError",
    "RunFolderError",
    "Prefix",
    "PromptConfig",
    "SequenceClassification",
    "SoftPrompt",
    "StepMetrics",
    "compiled_memory",
    "fold_prompt",
    "init_prompt",
    "init_trainable",
    "iterate_batches",
    "load_backbone",
    "load_prompt",
    "local_train",
    "make_eval_step",
    "make_loss_fn",
    "make_train_step",
    "materialize",
    "PromptArtifact",
    "save_prompt",
]
