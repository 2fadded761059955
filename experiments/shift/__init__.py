"""Transfer under distribution shift (run.py) and choosing what to transfer
(model_selection.py)."""
import json
import os
import time


def cached_json(path: str, key: dict, compute):
  """compute()'s record (JSON-serialisable, 'wall_s' added), written to `path` with `key` (the
  settings it was made with) as soon as it exists, so a stopped run resumes after it; a file
  already at `path` with the same key is read instead of computing again."""
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached["args"] == key:
      return cached["record"]
  t = time.time()
  record = compute()
  record["wall_s"] = time.time() - t
  with open(path, "w") as f:
    json.dump({"args": key, "record": record}, f, indent=1, default=float)
  return record
