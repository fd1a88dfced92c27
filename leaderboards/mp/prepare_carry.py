"""Build ``.carry_mp/``: what ``gpu_equal_budget.sh`` needs on a GPU machine without pymatgen.

``.carry_mp/cache/``: the processed-tensor cache of the ``flla_2015`` MP structures (z, positions,
cells, labels; ~2 MB), which :class:`~equiformer.datasets.materials_project.MaterialsProject` loads
when the raw CSV is absent. ``.carry_mp/data/materials_project/megnet_splits/``: the official
MP-2018.6.1 split files (the labels and the split come from them). Run here (with pymatgen):

    python leaderboards/mp/prepare_carry.py [--out .carry_mp]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(".carry_mp"))
    p.add_argument("--data-dir", type=Path, default=None, help="shared data folder (default ../shared/data)")
    p.add_argument("--subset", type=int, default=None, help="first N structures only (smoke tests)")
    args = p.parse_args(argv)

    from equiformer.datasets.crystals import default_data_dir
    from equiformer.datasets.materials_project import MaterialsProject

    data_dir = args.data_dir or default_data_dir()
    cache = args.out / "cache"
    if cache.exists():
        shutil.rmtree(cache)
    ds = MaterialsProject(root=cache, structures="flla_2015", targets=["e_form", "gap"], data_dir=data_dir,
                          subset=args.subset, progress=False, processes=1)
    splits = args.out / "data" / "materials_project" / "megnet_splits"
    splits.mkdir(parents=True, exist_ok=True)
    for f in sorted((data_dir / "materials_project" / "megnet_splits").glob("*.json.zip")):
        shutil.copy2(f, splits / f.name)
    print(f"{ds.cache_path} ({ds.cache_path.stat().st_size / 1e6:.1f} MB): {ds.summary()}")
    print(f"split files: {sorted(x.name for x in splits.iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
