"""TSBD: NWC-based backdoor reinitialization (stage 1) and activeness-aware
fine-tuning (stage 2). One stage per module; configs in :mod:`.config`."""

from defense_core.tsbd.aft import AFTStepper, FinetuneResult, finetune_
from defense_core.tsbd.choose_n import choose_neuron_ratio
from defense_core.tsbd.config import AFTConfig, ReinitConfig, UnlearnConfig
from defense_core.tsbd.nwc import NeuronRanking, NeuronScore, rank_neurons, ranked_conv_layers
from defense_core.tsbd.reinit import ReinitResult, zero_reinit_
from defense_core.tsbd.unlearning import UnlearnResult, unlearn_

__all__ = [
    "AFTConfig", "AFTStepper", "FinetuneResult", "NeuronRanking", "NeuronScore", "ReinitConfig",
    "ReinitResult", "UnlearnConfig", "UnlearnResult", "choose_neuron_ratio", "finetune_",
    "rank_neurons", "ranked_conv_layers", "unlearn_", "zero_reinit_",
]
