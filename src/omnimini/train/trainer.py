"""The training loop: one process on a CPU, or one process per GPU under torchrun with FSDP2.

Every rank reads the same deterministic sample stream and keeps its slice of each global batch, and the LM loss
is normalised by the number of label tokens in the whole global batch, so gradient accumulation and data
parallelism compute exactly the gradient of one big batch: N processes match one process with the same global
batch, and a resumed run repeats the uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from omnimini.config import ConfigError, ModelConfig, param_counts
from omnimini.data.chat import IGNORE, ChatSource
from omnimini.data.loader import Mixture, collate
from omnimini.data.packing import PackedText
from omnimini.model.model import OmniModel
from omnimini.train import dist as D
from omnimini.train import state as S
from omnimini.train.config import DataSpec, TrainConfig
from omnimini.train.flops import flops_per_token, peak_flops
from omnimini.train.loss import weighted_cross_entropy
from omnimini.train.optim import make_optimizer

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """A training run that cannot continue (non-finite loss, unusable resume state)."""


# ---- setup -------------------------------------------------------------------------------------------------


def load_tokenizer(cfg: TrainConfig):
    from omnimini.tokenizer import Tokenizer

    where = cfg.tokenizer or cfg.init_from
    if where is None:
        raise ConfigError("no tokenizer: set `tokenizer` (a directory) or `init_from` (a checkpoint with one)")
    return Tokenizer.from_dir(where)


def build_model(cfg: TrainConfig, tok) -> OmniModel:
    if cfg.init_from:
        model = OmniModel.from_pretrained(cfg.init_from)
        model.train()
        return model
    mcfg = cfg.model_config()
    if tok.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {mcfg.vocab_size}")
    if mcfg.vision is not None and mcfg.image_token_id is None:
        mcfg.image_token_id = tok.image_token_id
    torch.manual_seed(cfg.seed)
    return OmniModel(mcfg)


def build_source(spec: DataSpec, tok, mcfg: ModelConfig, cfg: TrainConfig, seed: int, repeat: bool = True):
    if spec.kind == "text":
        eos = tok.token_to_id("<|endoftext|>")
        eos = eos if eos is not None else tok.eos_token_ids[0]
        return PackedText(spec.paths, lambda s: tok.encode(s, allow_special=False), eos, cfg.seq_len,
                          text_key=spec.text_key, split=spec.split, strict=cfg.strict_data,
                          reset_positions=spec.reset_positions, repeat=repeat, data_dir=cfg.data_dir)
    if spec.kind == "chat":
        return ChatSource(spec.paths, tok, cfg.seq_len, seed=seed, strict=cfg.strict_data,
                          substitutions=spec.substitutions, data_dir=cfg.data_dir)
    from omnimini.data.scene_samples import SceneSource

    return SceneSource(tok, mcfg, cfg.seq_len, kind=spec.scene_kind, families=spec.families, seed=seed,
                       qa_format=spec.qa_format, balanced=spec.balanced_answers)


def build_mixture(specs: list[DataSpec], tok, mcfg, cfg, seed: int, repeat: bool = True) -> Mixture:
    sources = {}
    for i, spec in enumerate(specs):
        name = spec.name or f"{i}:{spec.kind}"
        sources[name] = (build_source(spec, tok, mcfg, cfg, seed + i, repeat), spec.weight)
    return Mixture(sources)


def autocast_ctx(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _moe_layers(model) -> list:
    return [b.mlp for b in model.blocks if getattr(b, "is_moe", False)]


# ---- the loop ----------------------------------------------------------------------------------------------


class ModelStep:
    """The part of a training step that touches the model: forward + backward over one global batch's
    micro-batches, gradient clipping, the optimizer and schedule step, and the MoE bias update.

    bench/train_speed.py times exactly this object, so its figures are the trainer's step.
    """

    def __init__(self, model: OmniModel, cfg: TrainConfig, info: D.DistInfo):
        self.model, self.cfg, self.info = model, cfg, info
        self.mcfg = model.config
        self.moe = _moe_layers(model)
        if info.enabled:
            D.shard(model)
        if info.device.type == "cuda":
            # cuDNN's bf16 attention backward returned NaN gradients (finite forward and loss) for the vision
            # encoder's 64-patch attention at step 548 of the nano recipe on an H100 (found with autograd anomaly
            # detection; a known cuDNN SDPA bug). Flash / memory-efficient attention take over at no cost here.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.forward = torch.compile(model) if cfg.compile else model
        self.opt, self.sched = make_optimizer(model, cfg)

    def __call__(self, micro_batches: list[dict]) -> dict:
        cfg, dev = self.cfg, self.info.device
        self.model.train()
        lm_sum = torch.zeros((), device=dev)
        aux_sum, z_sum = torch.zeros((), device=dev), torch.zeros((), device=dev)
        load = None
        for mb in micro_batches:
            mb = _to(mb, dev)
            with autocast_ctx(cfg, dev):
                out = self.forward(mb["input_ids"], positions=mb["positions"], pixels=mb["pixels"])
            lm = weighted_cross_entropy(out.logits.float(), mb["labels"], mb["weights"][:, None], IGNORE,
                                        overwrite_logits=True)
            # x world: FSDP averages gradients over ranks, we want the sum over the global batch
            loss = lm * self.info.world
            if out.aux_loss is not None:
                m = self.mcfg.moe
                loss = loss + (m.aux_loss_coef * out.aux_loss + m.z_loss_coef * out.z_loss) / cfg.grad_accum
                aux_sum += out.aux_loss.detach() / cfg.grad_accum
                z_sum += out.z_loss.detach() / cfg.grad_accum
                load = out.expert_load.detach() if load is None else load + out.expert_load.detach()
            loss.backward()
            lm_sum += lm.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                               else float("inf"), foreach=True)
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        stats = torch.stack([lm_sum, aux_sum, z_sum]).float()
        D.all_reduce_sum(stats, self.info)
        lm_loss = float(stats[0])
        if not math.isfinite(lm_loss):
            raise TrainError(f"loss became {lm_loss}; lower lr or check the data")
        if not math.isfinite(float(gnorm)):
            # a finite loss with non-finite gradients is a numerical fault in some backward kernel; stepping would
            # turn every weight into NaN, so stop with the weights (and the last checkpoint) intact
            self.opt.zero_grad(set_to_none=True)
            raise TrainError(f"gradient norm became {float(gnorm)} with a finite loss ({lm_loss:.4g}); weights not "
                             "updated. Check for a backward-kernel fault with torch.autograd.detect_anomaly")
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        rec = {"loss": lm_loss, "lr": lr, "grad_norm": float(gnorm)}
        if load is not None:
            load = D.all_reduce_sum(load.float(), self.info)
            for mod, row in zip(self.moe, load, strict=True):
                mod.update_selection_bias(row)
            rec["aux_loss"] = float(stats[1]) / self.info.world
            rec["z_loss"] = float(stats[2]) / self.info.world
            rec["expert_load"] = load.round().long().tolist()
        return rec


class Trainer:
    def __init__(self, cfg: TrainConfig, tokenizer=None):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.info = D.init(cfg.device)
        self.tok = tokenizer or load_tokenizer(cfg)
        self.model = build_model(cfg, self.tok).to(self.info.device)
        self.mcfg = self.model.config
        self.run_step = ModelStep(self.model, cfg, self.info)
        self.forward, self.opt, self.sched = self.run_step.forward, self.run_step.opt, self.run_step.sched
        self.data = build_mixture(cfg.data, self.tok, self.mcfg, cfg, cfg.seed)
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.step, self.history, self.val_history = 0, [], []
        self.tokens_seen = 0
        self.global_batch = cfg.micro_batch_size * cfg.grad_accum * self.info.world
        self.flops_tok = flops_per_token(self.mcfg, cfg.seq_len)
        self.peak = None
        self._val_batches = None

    # -- state --
    def resume(self, path: str | Path | None = None) -> bool:
        p = Path(path) if path else S.latest_checkpoint(self.ckpt_dir)
        if p is None:
            return False
        st = S.load_checkpoint(p, self.model, self.opt, self.sched)
        self.data.load_state_dict(st["data"])
        self.step, self.history = st["step"], st.get("history", [])
        self.val_history, self.tokens_seen = st.get("val_history", []), st.get("tokens_seen", 0)
        if self.info.main:
            self._truncate_log()
            log.info("resumed from %s at step %d", p, self.step)
        return True

    def _truncate_log(self) -> None:
        # steps logged after the checkpoint (before a crash) are redone: drop them so the log has each step once
        f = self.out / "log.jsonl"
        if f.is_file():
            keep = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
            f.write_text("".join(ln + "\n" for ln in keep))

    def save(self) -> Path:
        extra = {"data": self.data.state_dict(), "history": self.history, "val_history": self.val_history,
                 "tokens_seen": self.tokens_seen, "train_config": self.cfg.to_dict()}
        return S.save_checkpoint(self.ckpt_dir, self.step, self.model, self.opt, self.sched, extra, self.tok,
                                 main=self.info.main, keep=self.cfg.keep_checkpoints)

    # -- one optimizer step --
    def _micro_batches(self, samples: list[dict], weights: list[float]) -> list[dict]:
        mbs, w, r = self.cfg.micro_batch_size, self.info.world, self.info.rank
        pad_to = self.cfg.seq_len if self.cfg.compile else None  # fixed shapes avoid recompiles
        out = []
        for a in range(self.cfg.grad_accum):
            lo, hi = (a * w + r) * mbs, (a * w + r + 1) * mbs
            mb = collate(samples[lo:hi], self.tok.pad_token_id, pad_to)
            mb["weights"] = torch.tensor(weights[lo:hi])
            out.append(mb)
        return out

    def _token_weights(self, samples: list[dict]) -> list[float]:
        """Per-sample weight of each label token, so the global batch loss is a mean over label tokens
        (loss_norm=token) or over samples (loss_norm=sample: a one-letter answer counts as much as an essay)."""
        n = [sum(1 for x in s["labels"] if x != IGNORE) for s in samples]
        if self.cfg.loss_norm == "sample":
            k = sum(1 for x in n if x)
            return [1.0 / (x * k) if x else 0.0 for x in n]
        total = max(1, sum(n))
        return [1.0 / total] * len(samples)

    def train_step(self) -> dict:
        samples = [next(self.data) for _ in range(self.global_batch)]
        n_global = sum(sum(1 for x in s["labels"] if x != IGNORE) for s in samples)
        tokens = sum(len(s["input_ids"]) for s in samples)
        try:
            stats = self.run_step(self._micro_batches(samples, self._token_weights(samples)))
        except TrainError as e:
            raise TrainError(f"step {self.step + 1}: {e}") from None
        rec = {"step": self.step + 1, **stats, "tokens": tokens, "label_tokens": n_global}
        self.step += 1
        self.tokens_seen += tokens
        return rec

    # -- validation --
    def validate(self) -> float | None:
        cfg = self.cfg
        if not cfg.val_data:
            return None
        if self._val_batches is None:
            mix = build_mixture(cfg.val_data, self.tok, self.mcfg, cfg, cfg.seed + 1000, repeat=False)
            samples = []
            for _ in range(cfg.val_batches * cfg.micro_batch_size):
                try:
                    samples.append(next(mix))
                except StopIteration:
                    break
            mbs = cfg.micro_batch_size
            self._val_batches = [collate(samples[i:i + mbs], self.tok.pad_token_id)
                                 for i in range(0, len(samples), mbs)]
        self.model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for b in self._val_batches:
                b = _to(b, self.info.device)
                k = int((b["labels"] != IGNORE).sum())
                if not k:
                    continue
                with autocast_ctx(cfg, self.info.device):
                    out = self.forward(b["input_ids"], labels=b["labels"], positions=b["positions"],
                                       pixels=b["pixels"])
                total += float(out.lm_loss) * k
                n += k
        self.model.train()
        return total / n if n else None

    # -- the run --
    def fit(self, stop_after: int | None = None) -> dict:
        """Train until cfg.steps (or until `stop_after` steps have been done, to simulate an interruption)."""
        cfg, main = self.cfg, self.info.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.peak is None:
            self.peak = peak_flops(self.info.device, cfg.peak_tflops) * self.info.world
        end = min(cfg.steps, stop_after) if stop_after else cfg.steps
        logf = open(self.out / "log.jsonl", "a") if main else None  # noqa: SIM115
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (main and cfg.progress), desc="train",
                   dynamic_ncols=True)
        t_run, tok_run, steps_run = time.perf_counter(), 0, 0
        try:
            while self.step < end:
                t0 = time.perf_counter()
                rec = self.train_step()
                dt = time.perf_counter() - t0
                tok_run += rec["tokens"]
                steps_run += 1
                rec["tok_per_s"] = rec["tokens"] / dt
                rec["mfu"] = rec["tok_per_s"] * self.flops_tok / self.peak
                self.history.append({"step": rec["step"], "loss": rec["loss"]})
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    rec["val_loss"] = self.validate()
                    self.val_history.append({"step": self.step, "val_loss": rec["val_loss"]})
                if logf and self.step % cfg.log_every == 0:
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_per_s']:.0f}",
                                mfu=f"{100 * rec['mfu']:.1f}%")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                    self.save()
        finally:
            bar.close()
            if logf:
                logf.close()
        elapsed = time.perf_counter() - t_run
        self.save()
        val = self.validate()
        if val is not None:
            self.val_history.append({"step": self.step, "val_loss": val})
        report = self.report(elapsed, tok_run, steps_run, val)
        if main:
            (self.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            (self.out / "report.md").write_text(format_report(report))
        return report

    def report(self, elapsed: float, tokens: int, steps: int, val: float | None) -> dict:
        pc = param_counts(self.mcfg)
        last = self.history[-10:]
        tps = tokens / elapsed if elapsed > 0 else 0.0
        return {"out_dir": str(self.out), "steps": self.step, "steps_this_run": steps, "world_size": self.info.world,
                "global_batch": self.global_batch, "seq_len": self.cfg.seq_len, "tokens_seen": self.tokens_seen,
                "seconds": elapsed, "tok_per_s": tps, "mfu": tps * self.flops_tok / self.peak if self.peak else None,
                "first_loss": self.history[0]["loss"] if self.history else None,
                "final_loss": sum(h["loss"] for h in last) / len(last) if last else None,
                "val_loss": val, "total_params": pc["total_params"], "active_params": pc["active_params"],
                "checkpoint": str(S.latest_checkpoint(self.ckpt_dir)), "data_problems": self.data_problems()}

    def data_problems(self) -> int:
        return sum(getattr(getattr(s, "problems", None), "count", 0) for s, _ in self.data.sources.values())


def format_report(r: dict) -> str:
    def f(x, spec=".4f"):
        return "n/a" if x is None else format(x, spec)

    lines = [f"# Training report: {r['out_dir']}", "",
             f"- steps: {r['steps']} ({r['steps_this_run']} this run), world size {r['world_size']}, "
             f"global batch {r['global_batch']} x {r['seq_len']} tokens",
             f"- tokens seen: {r['tokens_seen']:,}; {f(r['tok_per_s'], '.0f')} tokens/s; "
             f"MFU {f(100 * r['mfu'] if r['mfu'] else None, '.2f')}%; {r['seconds']:.1f} s",
             f"- loss: first {f(r['first_loss'])}, final (mean of last 10) {f(r['final_loss'])}, "
             f"validation {f(r['val_loss'])}",
             f"- parameters: {r['total_params']:,} total, {r['active_params']:,} active per token",
             f"- checkpoint: {r['checkpoint']}; skipped bad data items: {r['data_problems']}"]
    for k in ("unigram_entropy", "scene_eval"):
        if k in r:
            lines.append(f"- {k}: {r[k]}")
    return "\n".join(lines) + "\n"


def train(cfg: TrainConfig, resume: str | bool = "auto", tokenizer=None, stop_after: int | None = None) -> dict:
    """Run one training stage; resume="auto" continues from the newest checkpoint in out_dir if there is one."""
    tr = Trainer(cfg, tokenizer)
    if resume == "auto" or resume is True:
        tr.resume()
    elif resume:
        tr.resume(resume)
    return tr.fit(stop_after=stop_after)
