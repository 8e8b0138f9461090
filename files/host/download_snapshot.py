"""Download one snapshot into the HF cache at CACHE (huggingface_hub's own snapshot_download).

Runs on a host in the runtime image with the ML env mounted; prints the snapshot folder.
usage: download_snapshot.py CACHE REPO_ID REPO_TYPE COMMIT ALLOW_JSON IGNORE_JSON
"""

import json
import sys

from huggingface_hub import snapshot_download

cache, repo_id, repo_type, commit, allow, ignore = sys.argv[1:7]
print(snapshot_download(repo_id, repo_type=repo_type, revision=commit, cache_dir=cache,
                        allow_patterns=json.loads(allow), ignore_patterns=json.loads(ignore)))
