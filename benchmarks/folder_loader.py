"""Images/s of the streamed folder loader (common.train_batches on --dataset imagenet) beside torchvision's own
ImageFolder + DataLoader, at equal workers, on a folder of real image files.

Both decode with Pillow and apply RandomResizedCrop(S) + RandomHorizontalFlip, then normalise with ImageNet's
statistics; ours draws each image's augmentation from its own seeded stream and normalises the uint8 batch
on the device, torchvision's uses ToTensor + Normalize in the workers. Each pipeline reads the whole folder
once per round (shuffled, batch B); the rounds alternate (ours, theirs, ours, ...) so both see the same
machine load, and the best round of each is reported with the ratio.

  python tools/cifar_to_folder.py DATA_DIR /tmp/cifar10_jpeg --format jpeg --train-count 5000
  python benchmarks/folder_loader.py /tmp/cifar10_jpeg --workers 2 --image-size 224
"""

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402  (importing it has no side effects)


def ours(folder, options):
    args = SimpleNamespace(
        dataset="imagenet",
        data_dir=str(folder),
        normalize="imagenet",
        train_subset=None,
        test_subset=None,
        amp=False,
        image_size=options.image_size,
        workers=options.workers,
    )
    data = common.load_data(args, "cpu")

    def one_pass(round_number):
        count = 0
        for images, _, _ in common.train_batches(data, options.batch_size, common.epoch_generator(1, round_number)):
            count += len(images)
        return count

    return one_pass


def torchvisions(folder, options):
    import torchvision
    from torchvision import transforms

    mean, std = common.NORMALIZE["imagenet"]
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(options.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(Path(folder) / "train", transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=options.batch_size, shuffle=True, num_workers=options.workers
    )

    def one_pass(round_number):
        return sum(len(images) for images, _ in loader)

    return one_pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="an image folder: train/<class>/* (and val/<class>/*)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    torch.set_num_threads(1)  # the workers decode; the main process only collates and normalises
    pipelines = {
        "ours (common.train_batches)": ours(options.folder, options),
        "torchvision ImageFolder": torchvisions(options.folder, options),
    }
    best = {name: 0.0 for name in pipelines}
    for round_number in range(options.rounds):
        for name, one_pass in pipelines.items():
            started = time.time()
            count = one_pass(round_number)
            speed = count / (time.time() - started)
            best[name] = max(best[name], speed)
            print(f"round {round_number + 1} {name}: {count} images, {speed:.0f} img/s", flush=True)
    (ours_speed, theirs_speed) = best.values()
    print(
        f"best of {options.rounds}: ours {ours_speed:.0f} img/s, torchvision {theirs_speed:.0f} img/s, "
        f"ratio {ours_speed / theirs_speed:.2f} (workers {options.workers}, {options.image_size} px, "
        f"batch {options.batch_size})"
    )


if __name__ == "__main__":
    main()
