"""The end of a training run: the model and its tokenizer / image processor saved, all_results.json, the model card,
the lines that say how it went and how to reload it, and the push to the Hub."""
import json
from pathlib import Path

from .hub import push_to_hub
from .model_card import write_model_card


def save_model(accelerator, model, args, processor=None):
    """safetensors weights + config (+ tokenizer / image processor) in args.output_dir."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards; every process must call it
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save, state_dict=state_dict, safe_serialization=True)
    if processor is not None and accelerator.is_main_process:
        processor.save_pretrained(args.output_dir)
    accelerator.wait_for_everyone()


def write_results(args, result, sparsity, extra=None, dense_rate=None):
    """all_results.json in output_dir (main process only). result: the training loop's; sparsity: the Pixelfly
    model's sparsity summary (None when dense); dense_rate: --compare_dense_steps' measured dense rate."""
    results = {**{f"eval_{k}": v for k, v in result["final_eval"].items()},
               **({f"initial_eval_{k}": v for k, v in result["initial_eval"].items()}
                  if result["initial_eval"] else {}),
               "completed_steps": result["completed_steps"], "train_seconds": result["train_seconds"],
               "stopped_by": result["stopped_by"],
               f"train_{result['unit']}_per_second": result["throughput"],
               f"steady_{result['unit']}_per_second": result["steady_throughput"],
               **({f"dense_{result['unit']}_per_second": dense_rate} if dense_rate else {}),
               "pixelfly": not args.dense and result["densified_at"] is None,
               "densified_at_step": result["densified_at"],
               "density": sparsity.get("density") if sparsity and result["densified_at"] is None else 1.0,
               "calibration_batches": 0 if args.dense else args.calibration_batches,
               **(extra or {})}
    (Path(args.output_dir) / "all_results.json").write_text(json.dumps(results, indent=2))
    return results


def compare_line(result, dense_rate, args):
    """The rate Pixelfly trained at beside --compare_dense_steps' dense rate, as one line."""
    unit, rate = result["unit"], result["steady_throughput"]
    dense = f"dense {dense_rate:,.0f} {unit}/s (timed on {args.compare_dense_steps} steps before training)"
    if rate is None:
        return (f"compared with dense: {dense}; Pixelfly's rate after its first {args.logging_steps} steps (compile "
                "and kernel tuning) needs a longer run: raise --max_train_steps or lower --logging_steps")
    return f"compared with dense: Pixelfly {rate:,.0f} {unit}/s after its first logged window, {dense}: " \
           f"{rate / dense_rate:.2f}x dense"


def finish(accelerator, args, model, result, sparsity, *, processor, recipe, base, dataset, model_class, metric,
           tags, extra=None, dense_rate=None):
    """A training script's tail: save the model and its tokenizer / image processor, all_results.json (plus `extra`)
    and the model card; print the metric before and after, the rate (beside dense_rate, --compare_dense_steps'
    measure) and how to reload; push with --push_to_hub."""
    save_model(accelerator, model, args, processor)
    if accelerator.is_main_process:
        results = write_results(args, result, sparsity, extra, dense_rate)
        write_model_card(accelerator.unwrap_model(model), args, result, results, recipe=recipe, base=base,
                         dataset=dataset, model_class=model_class, tags=tags)
        processor_class = "AutoImageProcessor" if hasattr(processor, "image_mean") else "AutoTokenizer"
        initial, final = result["initial_eval"], result["final_eval"]
        if initial:  # none after a resume
            print(f"validation {metric}: {initial[metric]:.4f} before -> {final[metric]:.4f} after "
                  f"{result['completed_steps']} steps")
        print(f"throughput: {result['throughput']:,.0f} {result['unit']}/s over {result['train_seconds']:.1f} s of "
              "training")
        if dense_rate:
            print(compare_line(result, dense_rate, args))
        print(f"saved to {args.output_dir}\nload it with:\n    import pixelfly_hf  # registers the Pixelfly "
              f"model types\n    from transformers import {model_class}, {processor_class}\n"
              f"    model = {model_class}.from_pretrained({args.output_dir!r})\n"
              f"    processor = {processor_class}.from_pretrained({args.output_dir!r})")
    push_to_hub(accelerator, args, "End of training")
