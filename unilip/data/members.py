"""How the members of a shard's tar file group into samples: webdataset's own naming, shared by the reader
(`unilip.data.shards`) and the sample counter (`unilip.data.index`), which must group them the same way."""

from __future__ import annotations

import re

# webdataset's own key/extension split: key up to the first dot of the file name, extension after it.
KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
