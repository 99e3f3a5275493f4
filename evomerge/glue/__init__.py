"""Model-GLUE: which models of a zoo can merge (`kinship`) and which of a cluster to merge
(`selection`)."""
