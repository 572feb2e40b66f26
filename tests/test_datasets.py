"""Training pairs: one caption per item (the original's pairs) or an image's captions grouped in one item, and
the training step that pairs each image embedding with its captions."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors
from PIL import Image
from torchvision import transforms

from misc.data.datasets import PairCollate, PairDataset, Record, load_records
from misc.data.decoded import Replacing, Undecodable
from misc.train.loop import train_one_epoch
from misc.errors import UserError
from misc.data.words import WordVectors


@pytest.fixture
def records(tmp_path: Path) -> list[Record]:
    out = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(path)
        out.append(Record(path, [f"image {i} caption {j}" for j in range(5 if i else 3)], i))
    return out


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def test_grouped_items_hold_the_same_pairs_as_single_ones(records: list[Record]) -> None:
    single = PairDataset(records, to_tensor, captions_per_image=5, seed=1)
    grouped = PairDataset(records, to_tensor, captions_per_image=5, seed=1, group=True)
    for epoch in (0, 1):
        single.set_epoch(epoch)
        grouped.set_epoch(epoch)
        assert len(single) == 20 and len(grouped) == 4
        pairs = Counter((index, caption) for _, [caption], index, _ in (single[i] for i in range(len(single))))
        items = [grouped[i] for i in range(len(grouped))]
        assert pairs == Counter((index, caption) for _, captions, index, _ in items for caption in captions)
        assert all(len(captions) == 5 for _, captions, _, _ in items)
        assert set(items[1][1]) == set(records[1].captions)  # every caption of an image with five
        assert set(items[0][1]) == set(records[0].captions)  # an image with three: all, some twice
    drawn = [PairDataset(records, to_tensor, 2, seed=1, group=True) for _ in range(2)]
    drawn[1].set_epoch(1)
    assert [drawn[0][i][1] for i in range(4)] != [drawn[1][i][1] for i in range(4)]  # order drawn per epoch


class Recorder(torch.nn.Module):
    """Image embedding: the image's grey level (image i is 40 * i); caption embedding: its first word vector."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor):
        return self.scale * images.mean(dim=(1, 2, 3))[:, None], words[:, 0]

    def score(self, images: torch.Tensor, texts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Row i holds the image output of pair i (the training loop repeats each image per caption)."""
        return images.expand(-1, len(texts))


def words() -> WordVectors:
    table = KeyedVectors(vector_size=1)
    table.add_vectors(["image"], np.ones((1, 1), dtype=np.float32))
    return WordVectors(table, Path("t"))


def test_training_step_pairs_each_image_with_its_captions(records: list[Record]) -> None:
    seen = []

    def loss_fn(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        assert scores.shape == (len(ids), len(ids))
        seen.append((scores.detach().diagonal(), ids))
        return scores.sum()

    dataset = PairDataset(records, to_tensor, 5, seed=0, group=True)
    loader = Replacing(torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=PairCollate(words())),
                       Undecodable("training image", "replaced"))
    model = Recorder()
    train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn, torch.device("cpu"),
                    progress=False)
    ids = torch.cat([i for _, i in seen])
    assert ids.tolist() == [i for i in range(4) for _ in range(5)]  # five captions per image, image by image
    torch.testing.assert_close(torch.cat([e for e, _ in seen]), 40.0 * ids.float())  # each with its own image


def test_a_json_lines_dataset_skips_images_that_cannot_be_read(records: list[Record], tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(records[1].image.read_bytes()[:40])
    lines = [{"image": "0.png", "captions": ["a grey image"]}, {"image": "missing.png", "captions": ["gone"]},
             {"image": "truncated.png", "captions": ["half an image"]}]
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines))
    kept = load_records(str(source), "train")
    assert [record.image.name for record in kept] == ["0.png"]
    assert "skipped 2 of 3 images that cannot be read" in caplog.text
    truncated.unlink()
    (tmp_path / "0.png").unlink()
    with pytest.raises(UserError, match="none of its 3 images can be read"):
        load_records(str(source), "train")


def test_an_image_that_fails_to_decode_is_replaced_with_its_captions(records: list[Record], tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    records[1] = Record(broken, ["a broken image"], 1)
    dataset = PairDataset(records, to_tensor, 1, seed=0)
    undecodable = Undecodable("training image", "replaced")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=PairCollate(words()), num_workers=1)
    batches = list(Replacing(loader, undecodable))  # a worker decodes: the count comes back with the batch
    assert [len(ids) for _, _, ids in batches] == [2, 2]  # every batch full
    assert [i for _, _, ids in batches for i in ids.tolist()] == [0, 2, 2, 3]  # image 1 -> image 2, with its captions
    torch.testing.assert_close(batches[0][0][1], batches[1][0][0])
    assert [path for path, _ in undecodable.listed()] == [str(broken)]
    assert caplog.text.count("cannot be decoded") == 1


def test_augmentation_depends_on_seed_epoch_and_item_only(records: list[Record]) -> None:
    pixels = np.arange(32 * 32 * 3, dtype=np.uint32).reshape(32, 32, 3) % 251
    Image.fromarray(pixels.astype(np.uint8)).save(records[0].image)
    crop = transforms.Compose([transforms.RandomResizedCrop(4, scale=(0.1, 1.0)), transforms.ToTensor()])
    dataset = PairDataset(records, crop, 5, seed=2)
    forward = [dataset[i][0] for i in range(len(dataset))]
    torch.manual_seed(99)  # another global random state, and another order
    backward = [dataset[i][0] for i in reversed(range(len(dataset)))][::-1]
    for first, second in zip(forward, backward):
        torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not all(torch.equal(forward[0], other) for other in forward[1:5])  # one image, different crops
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][0], forward[0])
