"""Train, validate, test or predict from a YAML config: `python train.py fit --config configs/demo.yaml`."""

from mmlongnet.training import CLI

if __name__ == "__main__":
    CLI()
