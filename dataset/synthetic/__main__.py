"""``python -m dataset.synthetic --out DIR --seed 0``: generate the built-in benchmark."""
from dataset.synthetic.cli import main

if __name__ == "__main__":
    main()
