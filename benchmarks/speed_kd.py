"""Images/s of kd.py's training step against a plain torchvision DataLoader pipeline, side by side.

Every configuration runs the same KD step (teacher forward under no_grad, student forward and
backward, SGD step; default resnet56 -> resnet20, batch 64); only the input pipeline and precision
differ:
  dataloader/wN : torchvision Dataset over PIL images + RandomCrop/RandomHorizontalFlip/ToTensor/
                  Normalize, DataLoader with N workers (what the official codes do);
  ours/fp32     : common.train_batches (uint8 images on the device, batched crop/flip there);
  ours/amp      : the same with bf16 autocast + channels_last (kd.py --amp).
The configurations take turns for several rounds so that machine noise hits all of them alike;
the median images/s per configuration is printed.

  python benchmarks/speed_kd.py --dataset cifar10 --data-dir /tmp/cifar10
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from kd import kd_loss  # noqa: E402


class PILCifar(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR* does per item: a PIL image through the transform."""

    def __init__(self, images, labels, transform):
        self.images = images.permute(0, 2, 3, 1).numpy()  # HWC uint8, as torchvision stores it
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index], index


def kd_step(student, teacher, optimizer, images, labels, device, amp):
    with common.autocast(device, amp):
        student_logits = student(images).float()
        with torch.no_grad():
            teacher_logits = teacher(images).float()
    loss = 0.1 * F.cross_entropy(student_logits, labels) + 0.9 * kd_loss(student_logits, teacher_logits, 4.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def endless(make_iterator):
    while True:
        yield from make_iterator()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N; unset means cuda when available")
    parser.add_argument("--json", metavar="FILE", help="also write the medians to FILE")
    options = parser.parse_args()
    device = common.get_device(options.device)
    torch.manual_seed(0)

    images, labels, _, _ = common.load_cifar(options.dataset, options.data_dir)
    num_classes = common.DATASETS[options.dataset]["num_classes"]
    mean, std = common.NORMALIZE["repdistiller"]
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    dataset = PILCifar(images, labels, transform)

    def ours(amp):
        args = argparse.Namespace(
            dataset=options.dataset, data_dir=options.data_dir, normalize="repdistiller", train_subset=None, amp=amp
        )
        data = common.load_data(args, device)
        epoch = iter(range(10**9))
        return endless(lambda: common.train_batches(data, options.batch_size, common.epoch_generator(0, next(epoch))))

    configs = {}
    for workers in options.workers:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=options.batch_size,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )  # as the official scripts on GPUs
        configs[f"dataloader/w{workers}"] = (endless(lambda loader=loader: iter(loader)), False)
    configs["ours/fp32"] = (ours(False), False)
    configs["ours/amp"] = (ours(True), True)

    models = {}
    for amp in (False, True):
        student = common.prepare_model(common.build_model(options.student, num_classes), device, amp).train()
        teacher = common.prepare_model(common.build_model(options.teacher, num_classes), device, amp).eval()
        optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        models[amp] = (student, teacher, optimizer)

    results = {name: [] for name in configs}
    for round_index in range(options.rounds):
        for name, (batches, amp) in configs.items():
            student, teacher, optimizer = models[amp]
            for step in range(options.warmup + options.steps):
                if step == options.warmup:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start, seen = time.time(), 0
                images_batch, labels_batch, _ = next(batches)
                images_batch = images_batch.to(device, non_blocking=True)
                labels_batch = torch.as_tensor(labels_batch).to(device, non_blocking=True)
                if amp:
                    images_batch = images_batch.contiguous(memory_format=torch.channels_last)
                kd_step(student, teacher, optimizer, images_batch, labels_batch, device, amp)
                if step >= options.warmup:
                    seen += len(labels_batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            results[name].append(seen / (time.time() - start))
            print(f"round {round_index + 1} {name}: {results[name][-1]:.0f} img/s", flush=True)

    reference = max(statistics.median(results[f"dataloader/w{w}"]) for w in options.workers)
    print(
        f"\n{options.teacher} -> {options.student}, batch {options.batch_size}, device {device}, "
        f"{torch.get_num_threads()} threads, median of {options.rounds} rounds x {options.steps} steps"
    )
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:16s} {median:8.0f} img/s  {median / reference:5.2f}x the fastest DataLoader")
    if options.json:
        Path(options.json).write_text(
            json.dumps(
                {
                    "benchmark": "speed_kd",
                    "device": str(device),
                    **common.runtime_info(device),
                    "pair": f"{options.teacher}->{options.student}",
                    "batch_size": options.batch_size,
                    "images_per_s": {name: statistics.median(values) for name, values in results.items()},
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
