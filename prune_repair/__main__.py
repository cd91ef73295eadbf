"""``python -m prune_repair`` (and ``torchrun -m prune_repair``): the command line."""

from prune_repair.cli import main

if __name__ == "__main__":
    main(prog_name="prune-repair")
