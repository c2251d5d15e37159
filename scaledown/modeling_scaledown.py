"""ScaleDown: online, query-dependent soft compression of retrieved documents (OSCAR, arXiv 2504.07109).

A compressor reads ``[query][document][MEM_1..MEM_l][RR]`` and its hidden states at the memory positions become
``l`` vectors per document. The generator (a causal LM with LoRA) reads a chat prompt whose Background block holds
one run of ``l`` placeholders per document; the placeholders are replaced by the compressed vectors.

This file travels with every checkpoint (``trust_remote_code``): its only project import is the configuration.
"""

import copy
import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import ModelOutput, cached_file, logging

from .configuration_scaledown import DEFAULT_SYSTEM_PROMPT, ScaleDownConfig

logger = logging.get_logger(__name__)

GENERATOR_MEMORY_TOKEN = "<MEM>"  # placeholder, overwritten by compressed vectors
GENERATOR_SEPARATOR_TOKEN = "<SEP>"  # learned separator between documents
GENERATOR_NEW_TOKENS = (GENERATOR_MEMORY_TOKEN, GENERATOR_SEPARATOR_TOKEN)
RERANK_TOKEN = "<RR>"
LORA_ADAPTER_NAME = "generator"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
COMPRESSOR_TOKENIZER_FOLDER = "compressor_tokenizer"
MERGED_GENERATOR_FOLDER = "generator"
_DOCUMENTS_MARKER = "\x00SCALEDOWN_DOCUMENTS\x00"


def compressor_memory_tokens(num_memory_tokens: int) -> list[str]:
    return [f"<MEM{i}>" for i in range(num_memory_tokens)]


@dataclass
class ScaleDownOutput(ModelOutput):
    """
    Args:
        loss: generation_loss + rerank_loss_weight * rerank_loss (whichever terms have targets).
        logits: `(n_label_tokens, vocab)` at the positions that predict a label when `labels` are given
            (full-vocabulary logits over the prompt are never computed in training), else `(batch, seq, vocab)`.
        generation_loss: mean cross-entropy over answer tokens.
        rerank_loss: mean squared error between rerank_scores and the teacher's scores.
        rerank_scores: `(n_documents,)` one score per compressed document, when reranking is enabled.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    generation_loss: torch.FloatTensor | None = None
    rerank_loss: torch.FloatTensor | None = None
    rerank_scores: torch.FloatTensor | None = None


@dataclass
class CompressionOutput(ModelOutput):
    """
    Args:
        embeddings: one tensor per question, `(n_documents_of_question, num_memory_tokens, generator_hidden)`.
        rerank_scores: one tensor per question, `(n_documents_of_question,)`, or None without a rerank head.
    """

    embeddings: list[torch.Tensor] | None = None
    rerank_scores: list[torch.Tensor] | None = None


def _special_prefix_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts before any text ([CLS], <s>, or nothing): read off a probe, not guessed."""
    with_special = tokenizer("probe", add_special_tokens=True)["input_ids"]
    plain = tokenizer("probe", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def _pad(rows: list[list[int]], pad_value: int, side: str) -> torch.Tensor:
    width = max((len(row) for row in rows), default=0)
    padded = []
    for row in rows:
        padding = [pad_value] * (width - len(row))
        padded.append(padding + row if side == "left" else row + padding)
    return torch.tensor(padded, dtype=torch.long).reshape(len(rows), width)


def validate_rag_inputs(questions, documents) -> None:
    """Raise a clear error for inputs that cannot be compressed."""
    if isinstance(questions, str):
        raise TypeError("questions must be a list of strings, got a single string: wrap it as [question].")
    if isinstance(documents, (str, bytes)) or not isinstance(documents, (list, tuple)):
        raise TypeError("documents must be a list with one list of document strings per question.")
    if len(questions) != len(documents):
        raise ValueError(
            f"Got {len(questions)} questions but {len(documents)} document lists: pass exactly one list of documents "
            "per question (an empty list for a question without documents)."
        )
    for index, (question, docs) in enumerate(zip(questions, documents)):
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"Question {index} is empty: every question needs text to compress its documents against.")
        if isinstance(docs, str) or not isinstance(docs, (list, tuple)):
            raise TypeError(
                f"documents[{index}] must be a list of strings, got {type(docs).__name__}: "
                "wrap a single document as [document]."
            )
        for doc_index, doc in enumerate(docs):
            if not isinstance(doc, str):
                raise TypeError(f"documents[{index}][{doc_index}] must be a string, got {type(doc).__name__}.")


def prompt_with_documents_block(tokenizer, question: str, documents_block: str, system_prompt: str) -> str:
    """The generator prompt as text: the chat template where the tokenizer has one, a plain layout otherwise."""
    user = f"Background:\n{documents_block}\n\nQuestion: {question}"
    if getattr(tokenizer, "chat_template", None):
        system = {"role": "system", "content": system_prompt}
        try:
            return tokenizer.apply_chat_template(
                [system, {"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
        except Exception:  # templates such as Mistral's reject a system turn: fold it into the user turn
            merged = {"role": "user", "content": f"{system_prompt}\n\n{user}"}
            return tokenizer.apply_chat_template([merged], tokenize=False, add_generation_prompt=True)
    prefix = tokenizer.decode(_special_prefix_ids(tokenizer))
    return f"{prefix}{system_prompt}\n\n{user}\nAnswer: "


def text_prompt(tokenizer, question: str, documents: list[str], system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The uncompressed prompt: what the teacher and the full-text baseline read. Zero documents = closed book."""
    block = "".join(f"Document {i + 1}: {doc}\n" for i, doc in enumerate(documents))
    return prompt_with_documents_block(tokenizer, question, block, system_prompt)


class ScaleDownInputBuilder:
    """Turns (question, documents[, answer]) into compressor and generator token ids.

    Every sequence is assembled by concatenating token ids, so the answer's labels start exactly where the prompt
    ends, whatever the tokenizer does at string boundaries.

    Compressor rows (right padded, one per document, questions in order):
        [special prefix] "Query:" query[:max_query_length] "Document:" document[:max_document_length] MEM_1..MEM_l [RR]
    Generator rows (left padded, one per question):
        chat prompt ... "Background:\\n" (<MEM>*l <SEP>) per document "\\n\\nQuestion: ..." [answer EOS]
    """

    def __init__(self, config: ScaleDownConfig, generator_tokenizer, compressor_tokenizer):
        self.config = config
        self.generator_tokenizer = generator_tokenizer
        self.compressor_tokenizer = compressor_tokenizer
        gen_ids = generator_tokenizer.convert_tokens_to_ids(list(GENERATOR_NEW_TOKENS))
        self.memory_placeholder_id, self.separator_id = gen_ids
        self.compressor_memory_ids = compressor_tokenizer.convert_tokens_to_ids(
            compressor_memory_tokens(config.num_memory_tokens)
        )
        self.rerank_token_id = compressor_tokenizer.convert_tokens_to_ids(RERANK_TOKEN)
        self.compressor_prefix_ids = _special_prefix_ids(compressor_tokenizer)
        self.query_marker_ids = compressor_tokenizer("Query: ", add_special_tokens=False)["input_ids"]
        self.document_marker_ids = compressor_tokenizer("\nDocument: ", add_special_tokens=False)["input_ids"]
        self.compressor_pad_id = _pad_id(compressor_tokenizer)
        self.generator_pad_id = _pad_id(generator_tokenizer)
        self._warned_truncation = False

    # ---- compressor -------------------------------------------------------------------------------------------
    def compressor_inputs(
        self, questions: list[str], documents: list[list[str]], return_query_lengths: bool = False
    ) -> dict[str, torch.Tensor]:
        """Right-padded compressor rows `(n_documents, compressor_len)`, one per document, question by question.

        return_query_lengths adds `compressor_query_lengths` `(n_documents,)`: how many leading tokens of each row
        (special prefix, query marker, query) all rows of its question share.
        """
        pairs = [(q, d) for q, docs in zip(questions, documents) for d in docs]
        tokenize = self.compressor_tokenizer
        query_ids = tokenize([q for q, _ in pairs], add_special_tokens=False)["input_ids"] if pairs else []
        doc_ids = tokenize([d for _, d in pairs], add_special_tokens=False)["input_ids"] if pairs else []
        suffix = list(self.compressor_memory_ids) + ([self.rerank_token_id] if self.config.enable_reranking else [])
        rows, query_lengths = [], []
        for q, d in zip(query_ids, doc_ids):
            if len(d) > self.config.max_document_length and not self._warned_truncation:
                warnings.warn(
                    f"A document has {len(d)} tokens, more than max_document_length={self.config.max_document_length}; "
                    "documents are truncated to that length (this warning is shown once).",
                    stacklevel=3,
                )
                self._warned_truncation = True
            rows.append(
                self.compressor_prefix_ids
                + self.query_marker_ids
                + q[: self.config.max_query_length]
                + self.document_marker_ids
                + d[: self.config.max_document_length]
                + suffix
            )
            query_lengths.append(
                len(self.compressor_prefix_ids) + len(self.query_marker_ids) + len(q[: self.config.max_query_length])
            )
        input_ids = _pad(rows, self.compressor_pad_id, side="right")
        attention_mask = _pad([[1] * len(r) for r in rows], 0, side="right")
        batch = {"compressor_input_ids": input_ids, "compressor_attention_mask": attention_mask}
        if return_query_lengths:
            batch["compressor_query_lengths"] = torch.tensor(query_lengths, dtype=torch.long)
        return batch

    # ---- generator --------------------------------------------------------------------------------------------
    def text_prompt(self, question: str, documents: list[str]) -> str:
        """The uncompressed prompt (teacher, full-text baseline) for this builder's generator tokenizer."""
        return text_prompt(self.generator_tokenizer, question, documents, self.config.system_prompt)

    def _prompt_ids(self, question: str, num_documents: int) -> list[int]:
        rendered = prompt_with_documents_block(
            self.generator_tokenizer, question, _DOCUMENTS_MARKER, self.config.system_prompt
        )
        before, after = rendered.split(_DOCUMENTS_MARKER)
        tokenize = self.generator_tokenizer
        block = ([self.memory_placeholder_id] * self.config.num_memory_tokens + [self.separator_id]) * num_documents
        return (
            tokenize(before, add_special_tokens=False)["input_ids"]
            + block
            + tokenize(after, add_special_tokens=False)["input_ids"]
        )

    def generator_inputs(
        self, questions: list[str], documents: list[list[str]], answers: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        rows, label_rows = [], []
        eos = self.generator_tokenizer.eos_token_id
        answer_ids = (
            self.generator_tokenizer(list(answers), add_special_tokens=False)["input_ids"] if answers is not None else None
        )
        for index, (question, docs) in enumerate(zip(questions, documents)):
            prompt = self._prompt_ids(question, len(docs))
            if answer_ids is None:
                rows.append(prompt)
                continue
            answer = answer_ids[index] + ([eos] if eos is not None else [])
            rows.append(prompt + answer)
            label_rows.append([-100] * len(prompt) + answer)
        batch = {
            "input_ids": _pad(rows, self.generator_pad_id, side="left"),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0, side="left"),
        }
        if answer_ids is not None:
            batch["labels"] = _pad(label_rows, -100, side="left")
        return batch

    def __call__(
        self,
        questions: list[str],
        documents: list[list[str]],
        answers: list[str] | None = None,
        rerank_scores: list[list[float]] | None = None,
        return_query_lengths: bool = False,
    ) -> dict[str, torch.Tensor]:
        validate_rag_inputs(questions, documents)
        batch = {
            **self.compressor_inputs(questions, documents, return_query_lengths),
            **self.generator_inputs(questions, documents, answers),
        }
        if rerank_scores is not None:
            flat = [float(s) for scores in rerank_scores for s in scores]
            batch["rerank_labels"] = torch.tensor(flat, dtype=torch.float32)
        return batch


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, 0):
        if candidate is not None:
            return candidate


def add_scaledown_tokens(config: ScaleDownConfig, generator_tokenizer, compressor_tokenizer) -> None:
    """Add ScaleDown's special tokens to both tokenizers (idempotent) and set left padding for generation."""
    _add_special_tokens(generator_tokenizer, list(GENERATOR_NEW_TOKENS))
    _add_special_tokens(compressor_tokenizer, compressor_memory_tokens(config.num_memory_tokens) + [RERANK_TOKEN])
    for tokenizer in (generator_tokenizer, compressor_tokenizer):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    generator_tokenizer.padding_side = "left"


def _add_special_tokens(tokenizer, tokens: list[str]) -> None:
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)


class ScaleDownPreTrainedModel(PreTrainedModel):
    config_class = ScaleDownConfig
    base_model_prefix = "scaledown"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    # forward returns a mean loss and takes no **kwargs: Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def init_weights(self):
        # The generator and compressor arrive initialised (pretrained or loaded) and ScaleDown's own modules are
        # initialised explicitly in __init__; a generic re-initialisation pass would overwrite pretrained weights.
        pass


class ScaleDownForCausalLM(ScaleDownPreTrainedModel):
    r"""
    Generator (causal LM + LoRA) answering from compressed documents, with an N-layers or encoder compressor.

    `ScaleDownForCausalLM(config)` loads the base checkpoints named in the config; `from_pretrained(path)` loads a
    ScaleDown checkpoint (small by default: the base generator is fetched by its id).
    """

    def __init__(
        self,
        config: ScaleDownConfig,
        generator: PreTrainedModel | None = None,
        compressor: PreTrainedModel | None = None,
        generator_tokenizer=None,
        compressor_tokenizer=None,
    ):
        if generator is None:
            generator = AutoModelForCausalLM.from_pretrained(config.generator_name_or_path, dtype="auto")
        if generator_tokenizer is None:
            generator_tokenizer = AutoTokenizer.from_pretrained(config.generator_name_or_path)
        config.generator_config = generator.config
        gen_config = generator.config.get_text_config() if hasattr(generator.config, "get_text_config") else generator.config

        if config.compressor_type == "n_layers":
            if config.num_compressor_layers > gen_config.num_hidden_layers:
                raise ValueError(
                    f"num_compressor_layers={config.num_compressor_layers} is larger than the generator's depth "
                    f"({gen_config.num_hidden_layers} layers): choose N <= {gen_config.num_hidden_layers}."
                )
            if compressor is None:
                compressor = _load_first_layers(
                    config.generator_name_or_path, gen_config, config.num_compressor_layers, generator.dtype
                )
            if compressor_tokenizer is None:
                compressor_tokenizer = copy.deepcopy(generator_tokenizer)
            # OSCAR takes the raw residual stream after layer N: the final norm belongs to the full-depth model.
            compressor.norm = nn.Identity()
        else:
            if compressor is None:
                compressor = AutoModel.from_pretrained(config.compressor_name_or_path, dtype=generator.dtype)
            if compressor_tokenizer is None:
                compressor_tokenizer = AutoTokenizer.from_pretrained(config.compressor_name_or_path)
        config.compressor_config = compressor.config

        super().__init__(config)
        add_scaledown_tokens(config, generator_tokenizer, compressor_tokenizer)
        self.generator_tokenizer = generator_tokenizer
        self.compressor_tokenizer = compressor_tokenizer
        self.input_builder = ScaleDownInputBuilder(config, generator_tokenizer, compressor_tokenizer)

        old_vocab = compressor.get_input_embeddings().num_embeddings
        if old_vocab < len(compressor_tokenizer):
            compressor.resize_token_embeddings(len(compressor_tokenizer), mean_resizing=False)
            _init_new_rows(compressor.get_input_embeddings().weight, first_new=old_vocab)
        self.compressor = compressor

        generator_hidden = gen_config.hidden_size
        compressor_hidden = compressor.config.hidden_size
        dtype = generator.dtype
        if config.uses_encoder_compressor:
            width = config.connector_hidden_size or 2 * generator_hidden
            self.connector = nn.Sequential(
                nn.Linear(compressor_hidden, width), nn.ReLU(), nn.Linear(width, generator_hidden)
            ).to(dtype)
        else:
            if compressor_hidden != generator_hidden:
                raise ValueError("An n_layers compressor must have the generator's hidden size.")
            self.connector = None
        self.rerank_head = nn.Linear(compressor_hidden, 1).to(dtype) if config.enable_reranking else None

        # Trainable rows for the tokens ScaleDown adds to the generator, kept outside its (frozen) vocabulary.
        self.new_token_embeddings = nn.Embedding(len(GENERATOR_NEW_TOKENS), generator_hidden).to(dtype)
        with torch.no_grad():
            base_rows = generator.get_input_embeddings().weight
            self.new_token_embeddings.weight.copy_(base_rows.mean(0, keepdim=True).expand_as(self.new_token_embeddings.weight))

        for parameter in generator.parameters():
            parameter.requires_grad_(False)
        if config.lora_r and config.lora_r > 0:
            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=config.lora_target_modules,
            )
            generator = inject_adapter_in_model(lora, generator, adapter_name=LORA_ADAPTER_NAME)
        self.generator = generator
        self.post_init()

    # ---- compression ------------------------------------------------------------------------------------------
    def compress_tensors(
        self, compressor_input_ids: torch.LongTensor, compressor_attention_mask: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compress right-padded compressor rows.

        Returns `(n_documents, num_memory_tokens, generator_hidden)` vectors and `(n_documents,)` rerank scores or None.
        """
        n_documents = compressor_input_ids.shape[0]
        num_memory = self.config.num_memory_tokens
        hidden_size = self.new_token_embeddings.embedding_dim
        if n_documents == 0:
            empty = self.new_token_embeddings.weight.new_zeros(0, num_memory, hidden_size)
            return empty, (empty.new_zeros(0) if self.rerank_head is not None else None)

        hidden = self.compressor(
            input_ids=compressor_input_ids, attention_mask=compressor_attention_mask
        ).last_hidden_state  # (n_documents, compressor_len, compressor_hidden)
        return self.read_compressed(hidden, compressor_attention_mask.sum(-1))

    def read_compressed(
        self, hidden: torch.Tensor, lengths: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Memory vectors and rerank scores from the compressor's last hidden states of right-padded rows.

        hidden: `(n_documents, len, compressor_hidden)`; lengths: `(n_documents,)` real tokens per row, which end
        with the memory tokens (then RR). Returns `(n_documents, l, generator_hidden)` and `(n_documents,)` or None.
        """
        n_documents, num_memory = hidden.shape[0], self.config.num_memory_tokens
        has_rr = self.rerank_head is not None
        first_memory = lengths - num_memory - int(has_rr)  # memory tokens close every row, the RR token after them
        positions = first_memory[:, None] + torch.arange(num_memory, device=hidden.device)  # (n_documents, l)
        memory_states = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # (n_documents, l, hc)
        scores = None
        if has_rr:
            rr_states = hidden[torch.arange(n_documents, device=hidden.device), lengths - 1]  # (n_documents, hc)
            scores = self.rerank_head(rr_states).squeeze(-1)  # (n_documents,)
        if self.connector is not None:
            memory_states = self.connector(memory_states)  # (n_documents, l, generator_hidden)
        return memory_states, scores

    def get_input_embeddings(self) -> torch.nn.Module:
        """The generator's token embeddings: what the prompt's text becomes (accelerate's FSDP2 shards them apart)."""
        return self.generator.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.generator.set_input_embeddings(value)

    def embed_generator_inputs(self, input_ids: torch.LongTensor, compressed: torch.Tensor) -> torch.Tensor:
        """Embed generator ids and write each document's vectors at its own placeholders, in order.

        input_ids: `(batch, seq)`; compressed: `(n_documents, l, hidden)` ordered as the placeholders appear row by row.
        Returns `(batch, seq, hidden)`.
        """
        builder = self.input_builder
        new_index = torch.full_like(input_ids, -1)
        new_index[input_ids == builder.memory_placeholder_id] = 0
        new_index[input_ids == builder.separator_id] = 1
        is_new = new_index >= 0
        base = self.generator.get_input_embeddings()(input_ids.masked_fill(is_new, 0))
        extra = self.new_token_embeddings(new_index.clamp(min=0)).to(base.dtype)
        embeds = torch.where(is_new[..., None], extra, base)

        placeholders = input_ids == builder.memory_placeholder_id  # (batch, seq)
        expected = compressed.shape[0] * compressed.shape[1]
        if not torch.compiler.is_compiling() and int(placeholders.sum()) != expected:
            raise ValueError(
                f"The generator input holds {int(placeholders.sum())} memory placeholders but the compressor produced "
                f"{expected} vectors: build both with the same ScaleDownInputBuilder call."
            )
        return embeds.masked_scatter(placeholders[..., None], compressed.to(embeds.dtype))

    @torch.no_grad()
    def compress(self, questions: list[str], documents: list[list[str]]) -> CompressionOutput:
        """Compress each question's documents: per-question `(n_docs, num_memory_tokens, generator_hidden)` tensors."""
        validate_rag_inputs(questions, documents)
        batch = self.input_builder.compressor_inputs(questions, documents)
        vectors, scores = self.compress_tensors(
            batch["compressor_input_ids"].to(self.device), batch["compressor_attention_mask"].to(self.device)
        )
        counts = [len(docs) for docs in documents]
        return CompressionOutput(
            embeddings=list(vectors.split(counts)),
            rerank_scores=list(scores.split(counts)) if scores is not None else None,
        )

    # ---- training / scoring -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        compressor_input_ids: torch.LongTensor,
        compressor_attention_mask: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        rerank_labels: torch.FloatTensor | None = None,
    ) -> ScaleDownOutput:
        r"""
        input_ids, attention_mask: `(batch, seq)` left-padded generator prompts with placeholders (+ answers).
        compressor_input_ids, compressor_attention_mask: `(n_documents, compressor_len)` right-padded, one row per
            document, ordered question by question.
        labels: `(batch, seq)`, -100 everywhere but the answer tokens (EOS included).
        rerank_labels: `(n_documents,)` teacher relevance scores.
        """
        compressed, rerank_scores = self.compress_tensors(compressor_input_ids, compressor_attention_mask)
        inputs_embeds = self.embed_generator_inputs(input_ids, compressed)  # (batch, seq, hidden)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        hidden = self.generator.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (batch, seq, hidden)
        lm_head = self.generator.get_output_embeddings()

        generation_loss = None
        if labels is not None:
            targets = labels[:, 1:]  # position t predicts token t + 1
            predicting = targets != -100  # (batch, seq - 1)
            logits = lm_head(hidden[:, :-1][predicting]).float()  # (n_label_tokens, vocab)
            if logits.shape[0] > 0:
                generation_loss = F.cross_entropy(logits, targets[predicting])
            else:
                generation_loss = logits.sum() * 0.0
        else:
            logits = lm_head(hidden).float()  # (batch, seq, vocab)

        rerank_loss = None
        if rerank_labels is not None and rerank_scores is not None:
            rerank_loss = F.mse_loss(rerank_scores.float(), rerank_labels.float().to(rerank_scores.device))

        loss = None
        if generation_loss is not None or rerank_loss is not None:
            loss = generation_loss if generation_loss is not None else 0.0
            if rerank_loss is not None:
                loss = loss + self.config.rerank_loss_weight * rerank_loss
        return ScaleDownOutput(
            loss=loss,
            logits=logits,
            generation_loss=generation_loss,
            rerank_loss=rerank_loss,
            rerank_scores=rerank_scores,
        )

    # ---- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        compressor_input_ids: torch.LongTensor,
        compressor_attention_mask: torch.LongTensor,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Greedy (by default) decoding from compressed documents; returns only the new tokens `(batch, new)`."""
        compressed, _ = self.compress_tensors(compressor_input_ids, compressor_attention_mask)
        inputs_embeds = self.embed_generator_inputs(input_ids, compressed)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.input_builder.generator_pad_id)
        if not generate_kwargs["do_sample"]:
            # Greedy decoding: drop the checkpoint's sampling defaults so transformers does not warn about them.
            for name in ("temperature", "top_p", "top_k"):
                generate_kwargs.setdefault(name, None)
        return self.generator.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)

    def generate_from_documents(
        self, questions: list[str], documents: list[list[str]], max_new_tokens: int = 32, **generate_kwargs
    ) -> list[str]:
        """Answer each question from its (compressed) documents. Any number of documents per question, zero included."""
        batch = self.input_builder(questions, documents)
        batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
        new_tokens = self.generate(**batch, max_new_tokens=max_new_tokens, **generate_kwargs)
        return [text.strip() for text in self.generator_tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    # ---- saving / loading -------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen base generator: LoRA, compressor, connector, new embeddings, rerank head."""
        return {
            name: tensor
            for name, tensor in self.state_dict().items()
            if not name.startswith("generator.") or "lora_" in name
        }

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload weights, remote code, both tokenizers and a model card in one commit.

        The card and the single-commit upload live in the `scaledown` package; a copy of this file loaded from the
        Hub without that package falls back to the plain transformers upload.
        """
        try:
            from scaledown.hub_cards import push_model
        except ImportError:
            return super().push_to_hub(repo_id, **kwargs)
        return push_model(self, repo_id, **kwargs)

    def save_pretrained(self, save_directory, *, merge_generator: bool = False, state_dict=None, **kwargs):
        """Save a ScaleDown checkpoint (safetensors only).

        By default the checkpoint is small and references the base generator by `generator_name_or_path`.
        `merge_generator=True` merges LoRA into the generator and writes it in full under `generator/`, so that
        loading needs no base download.
        """
        kwargs.pop("safe_serialization", None)
        os.makedirs(save_directory, exist_ok=True)
        state_dict = state_dict if state_dict is not None else self.state_dict()
        own = {k: v for k, v in state_dict.items() if not k.startswith("generator.") or "lora_" in k}
        config_backup = (self.config.lora_r, self.config.generator_subfolder)
        if merge_generator:
            own = {k: v for k, v in own.items() if not k.startswith("generator.")}
            self._save_merged_generator(os.path.join(save_directory, MERGED_GENERATOR_FOLDER))
            self.config.lora_r, self.config.generator_subfolder = 0, MERGED_GENERATOR_FOLDER
        self.register_for_auto_class("AutoModel")
        try:
            super().save_pretrained(save_directory, state_dict=own, **kwargs)
        finally:
            self.config.lora_r, self.config.generator_subfolder = config_backup
        if kwargs.get("is_main_process", True):
            self.generator_tokenizer.save_pretrained(save_directory)
            self.compressor_tokenizer.save_pretrained(os.path.join(save_directory, COMPRESSOR_TOKENIZER_FOLDER))

    def _save_merged_generator(self, directory: str) -> None:
        lora_layers = [m for m in self.generator.modules() if isinstance(m, BaseTunerLayer)]
        for layer in lora_layers:
            layer.merge(adapter_names=[LORA_ADAPTER_NAME])
        try:
            merged = {
                name.replace(".base_layer", ""): tensor.contiguous()
                for name, tensor in self.generator.state_dict().items()
                if "lora_" not in name
            }
            self.generator.save_pretrained(directory, state_dict=merged)
        finally:
            for layer in lora_layers:
                layer.unmerge()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        config: ScaleDownConfig | None = None,
        dtype=None,
        torch_dtype=None,
        device_map=None,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> "ScaleDownForCausalLM":
        """Load a ScaleDown checkpoint from a folder or a Hub repo id.

        The base generator is fetched by the config's `generator_name_or_path` (or read from the checkpoint's
        `generator/` folder for merged saves); everything ScaleDown trained comes from the checkpoint.
        """
        if model_args:
            raise TypeError(f"Unexpected positional arguments {model_args}.")
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
        for ignored in ("trust_remote_code", "_from_auto", "_commit_hash", "code_revision", "adapter_kwargs"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"ScaleDownForCausalLM.from_pretrained got unexpected arguments: {sorted(kwargs)}.")
        # A checkpoint in a subfolder of a folder or repo keeps its own subfolders (tokenizer, merged generator) under
        # it. AutoModel hands `subfolder` on, empty when none was asked for.
        subfolder = hub_kwargs.pop("subfolder", None) or ""
        path = str(pretrained_model_name_or_path)
        if subfolder and os.path.isdir(path):
            path, subfolder = os.path.join(path, subfolder), ""

        def inside(folder: str) -> str:
            return "/".join(part for part in (subfolder, folder) if part)

        _check_checkpoint_folder(path)
        if config is None:
            config = ScaleDownConfig.from_pretrained(path, subfolder=subfolder, **hub_kwargs)
        elif isinstance(config, (str, os.PathLike)):
            config = ScaleDownConfig.from_pretrained(config, **hub_kwargs)
        dtype = dtype if dtype is not None else (torch_dtype if torch_dtype is not None else "auto")

        load_kwargs = {"dtype": dtype}
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        if config.generator_subfolder:
            generator = AutoModelForCausalLM.from_pretrained(
                path, subfolder=inside(config.generator_subfolder), **load_kwargs, **hub_kwargs
            )
        else:
            generator = AutoModelForCausalLM.from_pretrained(config.generator_name_or_path, **load_kwargs)
        compressor_config = copy.deepcopy(config.compressor_config)
        if attn_implementation is not None:
            compressor_config._attn_implementation = attn_implementation
        compressor = AutoModel.from_config(compressor_config, dtype=generator.dtype)
        # Handing over the config keeps AutoTokenizer from resolving the checkpoint's remote-code config again.
        generator_tokenizer = AutoTokenizer.from_pretrained(path, subfolder=subfolder, config=config, **hub_kwargs)
        compressor_tokenizer = AutoTokenizer.from_pretrained(
            path, subfolder=inside(COMPRESSOR_TOKENIZER_FOLDER), config=config, **hub_kwargs
        )
        model = cls(
            config,
            generator=generator,
            compressor=compressor,
            generator_tokenizer=generator_tokenizer,
            compressor_tokenizer=compressor_tokenizer,
        )
        state_dict = _read_safetensors(path, {**hub_kwargs, "subfolder": subfolder})
        result = model.load_state_dict(state_dict, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"The checkpoint holds weights this model does not have: {result.unexpected_keys[:5]}...")
        missing = [k for k in result.missing_keys if not k.startswith("generator.") or "lora_" in k]
        if missing:
            raise ValueError(f"The checkpoint at {path} lacks trained weights: {missing[:5]}... Re-save it.")
        model.eval()
        if device_map is not None:
            model.to(device_map if isinstance(device_map, (str, torch.device)) and device_map != "auto" else _best_device())
        return model


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_checkpoint_folder(path: str) -> None:
    if not os.path.isdir(path):
        return  # a Hub repo id: hub errors name the missing file themselves
    required = ["config.json", "tokenizer_config.json", os.path.join(COMPRESSOR_TOKENIZER_FOLDER, "tokenizer_config.json")]
    for name in required:
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(
                f"{path} is missing {name}: it is not a complete ScaleDown checkpoint. "
                "Save one with model.save_pretrained(path) (it writes config, weights and both tokenizers)."
            )
    if not any(os.path.isfile(os.path.join(path, n)) for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        raise FileNotFoundError(
            f"{path} is missing {WEIGHTS_NAME}: the trained weights are not there. "
            "Save the model with model.save_pretrained(path) (safetensors only)."
        )


def _read_safetensors(path: str, hub_kwargs: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index_file = cached_file(path, WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if index_file is None:
        return load_file(cached_file(path, WEIGHTS_NAME, **hub_kwargs))
    with open(index_file) as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    state_dict = {}
    for shard in shards:
        state_dict.update(load_file(cached_file(path, shard, **hub_kwargs)))
    return state_dict


def _load_first_layers(generator_path: str, generator_config, num_layers: int, dtype) -> PreTrainedModel:
    """Load only the embeddings and first `num_layers` decoder layers of a checkpoint (safetensors are read lazily)."""
    trimmed = copy.deepcopy(generator_config)
    trimmed.num_hidden_layers = num_layers
    if isinstance(getattr(trimmed, "layer_types", None), list):
        trimmed.layer_types = trimmed.layer_types[:num_layers]
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the skipped deeper layers are expected, not worth a warning
    try:
        return AutoModel.from_pretrained(generator_path, config=trimmed, dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)


def _init_new_rows(weight: torch.Tensor, first_new: int) -> None:
    """New compressor tokens start at the mean embedding plus distinct noise, so MEM_i are told apart from the start."""
    with torch.no_grad():
        old = weight[:first_new].float()
        noise = torch.randn(weight.shape[0] - first_new, weight.shape[1], device=weight.device) * old.std(0)
        weight[first_new:] = (old.mean(0) + noise).to(weight.dtype)


__all__ = [
    "ScaleDownForCausalLM",
    "ScaleDownPreTrainedModel",
    "ScaleDownInputBuilder",
    "ScaleDownOutput",
    "CompressionOutput",
    "text_prompt",
]
