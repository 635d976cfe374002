"""The README's main-job command, end to end: data, untrained score, training, score, masks, gallery."""

import io

from PIL import Image

from raydeeplab import storage
from raydeeplab.quickstart import quickstart


def test_quickstart_trains_a_model_that_clearly_beats_an_untrained_one(ray_local, tmp_path):
    result = quickstart(str(tmp_path / "qs"), images=32, epochs=6)

    assert result["trained_mean_iou"] > result["untrained_mean_iou"] + 0.1
    assert (result["ok"], result["failed"]) == (4 + 8, 1)  # 4 photos + 8 validation images; 1 broken file
    gallery = Image.open(io.BytesIO(storage.read_bytes(result["gallery"])))
    assert gallery.format == "PNG" and gallery.width > 300 and gallery.height > 300
