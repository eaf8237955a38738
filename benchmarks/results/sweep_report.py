"""Print the runs of a sweep's MLflow store: name, status, pinned GPU, start and end (UTC), as a table.

python benchmarks/results/sweep_report.py sqlite:////tmp/sweep.db
"""

import datetime
import sys

import mlflow


def main(uri: str) -> None:
    client = mlflow.MlflowClient(uri)
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
            tags, info = run.data.tags, run.info

            def stamp(ms):
                return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%H:%M:%S")

            print(
                f"{info.run_name:40s} {info.status:9s} parent={tags.get('mlflow.parentRunId', '-')[:8]:8s} "
                f"cuda_visible_devices={tags.get('cuda_visible_devices', '-'):4s} "
                f"{stamp(info.start_time)}-{stamp(info.end_time) if info.end_time else '?'} "
                f"gpus={tags.get('gpus', '-')}"
            )


if __name__ == "__main__":
    main(sys.argv[1])
