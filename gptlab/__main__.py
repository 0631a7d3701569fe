"""``python -m gptlab ...`` is ``gpt ...`` (what ``torchrun -m gptlab run ...`` starts)."""

from gptlab.cli import main

if __name__ == "__main__":
    main()
