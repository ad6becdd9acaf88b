"""`python -m vidpo` (and so `torchrun -m vidpo`) runs the CLI."""
from vidpo.cli import main

if __name__ == "__main__":
    main()
