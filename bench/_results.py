"""What every bench script writes with its numbers: the run's facts and the JSON file."""
import datetime
import json
import os

import torch


def run_meta(**extra) -> dict:
    """GPU name, torch and Triton versions, today's date (plus ``extra``)."""
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), **extra}


def write_json(out_dir: str, name: str, obj) -> str:
    """``obj`` as indented JSON in ``out_dir/name`` (directory made if missing); returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print("wrote", path)
    return path
