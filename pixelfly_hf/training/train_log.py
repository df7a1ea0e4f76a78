"""Where training metrics go: output_dir/train_log.jsonl (one JSON line per record) and accelerate's trackers."""
import json
from pathlib import Path

LOG_FILE = "train_log.jsonl"


def init_tracking(accelerator, args, project_name):
    """Start accelerate's trackers (--with_tracking, --report_to) with the flags as the run's config."""
    if not args.with_tracking:
        return
    config = {k: (v.value if hasattr(v, "value") else v) for k, v in vars(args).items()}
    config = {k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in config.items()
              if isinstance(v, (int, float, str, bool, list))}
    accelerator.init_trackers(project_name, config)


class TrainLog:
    """One JSON line per record in output_dir/train_log.jsonl (main process), plus trackers."""

    def __init__(self, accelerator, args, resumed_step):
        """A fresh run (resumed_step None) starts a new log; a resumed one keeps the records up to its checkpoint."""
        self.accelerator = accelerator
        self.with_tracking = args.with_tracking
        self.path = Path(args.output_dir) / LOG_FILE
        if accelerator.is_main_process:
            # made only now, so a run stopped by a bad input leaves no --output_dir behind
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resumed_step is not None and self.path.is_file():
                records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
                kept = [r for r in records if r["step"] <= resumed_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record, step):
        if self.with_tracking:
            self.accelerator.log(record, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")
