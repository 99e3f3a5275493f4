"""Parameter-space merging: the method registry and the in-place builder.

METHODS                 name -> MergeMethod (mergekit's names and semantics)
get_method(name)        the method, or ValueError naming the known ones
method_params(name)     its ParamSpecs: name, per_source, default (None: required),
                        valid [low, high] and the default search range
build(recipe, sources, into)   validate, then write the merged weights into `into`
"""

from evomerge.merge.build import build, resolve
from evomerge.merge.methods import METHODS, get_method, method_params
from evomerge.merge.spec import BasePolicy, MergeMethod, OptionSpec, ParamSpec

__all__ = [
    "METHODS",
    "BasePolicy",
    "MergeMethod",
    "OptionSpec",
    "ParamSpec",
    "build",
    "get_method",
    "method_params",
    "resolve",
]
