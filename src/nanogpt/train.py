"""`python -m nanogpt.train ...` (and `torchrun ... -m nanogpt.train`): the nanogpt-train command."""

from nanogpt.cli.train import main

if __name__ == "__main__":
    main()
