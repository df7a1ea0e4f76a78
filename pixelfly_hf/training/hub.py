"""--push_to_hub: upload the final output folder, checkpoints left out."""
from .checkpoints import TMP_PREFIX


def push_to_hub(accelerator, args, commit_message):
    """Upload args.output_dir to args.hub_model_id (main process); returns the repo id, or None without the flag."""
    if not args.push_to_hub or not accelerator.is_main_process:
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message=commit_message,
                      ignore_patterns=["step_*", "epoch_*", f"{TMP_PREFIX}*"])
    accelerator.print(f"pushed to https://huggingface.co/{repo_id}")
    return repo_id
