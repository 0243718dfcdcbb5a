"""dp4tl: source-dataset pruning for transfer learning (label and feature mapping), pure PyTorch."""
