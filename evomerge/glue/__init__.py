"""Model-GLUE: which models of a zoo can merge (`kinship`), which of a cluster to merge
(`selection`), and a mixture of what cannot merge (`mixture`).

Importing this package registers the mixture model with the Auto classes, so an exported
mixture loads with `AutoModelForCausalLM.from_pretrained` and no remote code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.glue.mixture import MixtureConfig, MixtureForCausalLM

AutoConfig.register(MixtureConfig.model_type, MixtureConfig, exist_ok=True)
AutoModelForCausalLM.register(MixtureConfig, MixtureForCausalLM, exist_ok=True)
