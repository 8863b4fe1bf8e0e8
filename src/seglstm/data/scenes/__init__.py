"""Training on whole GeoTIFF scenes with vector or raster labels: the ``scenes`` dataset.

``spec`` parses ``scenes.yaml``; ``labels`` brings vector or raster labels into an image's pixel grid
window by window; ``splits`` makes the spatial splits and the buffer; ``dataset`` samples and reads the
windows; ``check`` reports on the data before training.
"""

from seglstm.data.scenes.dataset import SceneDataset
from seglstm.data.scenes.spec import ScenesFile, SceneSpec, SplitSpec, read_scenes_file

__all__ = ["SceneDataset", "SceneSpec", "ScenesFile", "SplitSpec", "read_scenes_file"]
