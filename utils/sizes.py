"""Image sizes on the command line: WIDTHxHEIGHT, as the report writes them (a leaf: no project imports)."""
import argparse
import re


def size_type(text):
    """'1280x720' (WIDTHxHEIGHT, as the report writes sizes) -> (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1024x512, got {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return height, width


def format_size(size_hw):
    return f"{size_hw[1]}x{size_hw[0]}"
