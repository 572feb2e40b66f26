"""Training pairs: one caption per item (the original's pairs) or an image's captions grouped in one item, and
the training step that pairs each image embedding with its captions."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors
from PIL import Image

from misc.datasets import PairCollate, PairDataset, Record
from misc.engine import train_one_epoch
from misc.words import WordVectors


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
        pairs = Counter((index, caption) for _, [caption], index in (single[i] for i in range(len(single))))
        items = [grouped[i] for i in range(len(grouped))]
        assert pairs == Counter((index, caption) for _, captions, index in items for caption in captions)
        assert all(len(captions) == 5 for _, captions, _ in items)
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


def test_training_step_pairs_each_image_with_its_captions(records: list[Record]) -> None:
    table = KeyedVectors(vector_size=1)
    table.add_vectors(["image"], np.ones((1, 1), dtype=np.float32))
    seen = []

    def loss_fn(image_emb: torch.Tensor, text_emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        assert image_emb.shape == text_emb.shape
        seen.append((image_emb.detach().squeeze(1), ids))
        return image_emb.sum()

    dataset = PairDataset(records, to_tensor, 5, seed=0, group=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=PairCollate(WordVectors(table, Path("t"))))
    model = Recorder()
    train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn, torch.device("cpu"),
                    progress=False)
    ids = torch.cat([i for _, i in seen])
    assert ids.tolist() == [i for i in range(4) for _ in range(5)]  # five captions per image, image by image
    torch.testing.assert_close(torch.cat([e for e, _ in seen]), 40.0 * ids.float())  # each with its own image
