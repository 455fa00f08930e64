"""Write a folder of images in the layout `--dataset imagefolder` reads: train/<class>/*.png and
val/<class>/*.png. The images are the digits that ship with easgd-local (28x28, grayscale),
so the example runs offline.

    python examples/make_image_folder.py digits [--per-class 200]
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=200, help="training images per digit")
    args = parser.parse_args()
    from easgd_local.data import load_split

    for split, train, per_class in (("train", True, args.per_class),
                                     ("val", False, max(1, args.per_class // 4))):
        digits = load_split("mnist10k", "datasets", train=train, device="cpu")
        counts = {d: 0 for d in range(10)}
        for i in range(len(digits)):
            digit = int(digits.labels[i])
            if counts[digit] >= per_class:
                continue
            folder = args.out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = digits.images[i, 0].numpy().astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").save(folder / f"{i}.png")
            counts[digit] += 1
    print(f"wrote {args.out}/train and {args.out}/val")


if __name__ == "__main__":
    main()
