"""dp4tl: source-dataset pruning for transfer learning (label and feature mapping), pure PyTorch.

DP4TL ("Selectivity Drives Productivity: Efficient Dataset Pruning for Enhanced Transfer
Learning", Zhang et al., NeurIPS 2023) keeps the source classes a target "uses" and pretrains
on them only. Modules:

- `dp4tl.surrogate`: the small net trained once on the full source (SurrogateConfig, safetensors I/O).
- `dp4tl.selection`: ClassSelection, label mapping, feature mapping (labels or K-means), SELECTORS.
- `dp4tl.baselines`: random class pruning (registered "random"), MODERATE data-wise selection.
- `dp4tl.formats`: the selection and kept-samples Parquet files.
- `dp4tl.methods`: pruning methods by name (lm, fm, random, lm_bottom, moderate, ...), ratio and
  input-size checks, SelectionConfig (methods x ratios x seeds) used by the `prune` flows.

Never imports prefect or ray (it depends on `distill` only).
"""
