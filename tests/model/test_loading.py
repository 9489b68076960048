"""Real-checkpoint loading path: a stock Qwen2.5-VL or Qwen3-VL directory written the way public ones are
(Qwen2.5-VL's published key names predate transformers' ``model.language_model`` layout; Qwen3-VL's are it)."""

import json

import pytest
import torch
from helpers import legacy_key
from safetensors.torch import save_file
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

from latentvl import LatentSettings
from latentvl.errors import ModelFormatError
from latentvl.model.backbone import family
from latentvl.model.loading import load_latent_model, save_latent_checkpoint
from latentvl.model.tiny import build_tiny_image_processor, build_tiny_tokenizer, tiny_config
from latentvl.tokens import LATENT_PAD, LATENT_TOKENS

STOCK = {"qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, legacy_key),
         "qwen3_vl": (Qwen3VLForConditionalGeneration, lambda key: key)}


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory, backbone):
    """A stock checkpoint of ``backbone``: no latent tokens or fields, sharded safetensors + index, the
    published key names."""
    stock_class, published_key = STOCK[backbone]
    path = tmp_path_factory.mktemp("stock")
    tokenizer = build_tiny_tokenizer()
    # the stock tokenizer has no latent tokens: rebuild the vocabulary without them
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if t not in LATENT_TOKENS}
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from latentvl.model.tiny import QWEN_SPECIAL_TOKENS

    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    stock_tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>")
    stock_tok.add_tokens(list(QWEN_SPECIAL_TOKENS), special_tokens=True)
    config = tiny_config(tokenizer, backbone=backbone)
    config.text_config.vocab_size = len(stock_tok)
    for name in LatentSettings.field_names():
        delattr(config, name)
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    torch.manual_seed(3)
    stock = stock_class(config)
    state = {published_key(k): v.contiguous() for k, v in stock.state_dict().items()}
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, shard_keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in shard_keys}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard_keys})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = config.to_dict()
    cfg["architectures"] = [stock_class.__name__]
    (path / "config.json").write_text(json.dumps(cfg))
    stock_tok.save_pretrained(path)
    build_tiny_image_processor(patch_size=family(backbone).PATCH_SIZE).save_pretrained(path)
    assert any(k.startswith("model.language_model") for k in weight_map) == (backbone == "qwen3_vl")
    return path, stock


def test_stock_checkpoint_loads_every_tensor(stock_dir):
    path, stock = stock_dir
    model, processor = load_latent_model(path)
    assert type(model).__mro__[2] is type(stock)  # the family's latent class, chosen from model_type
    ref = stock.state_dict()
    got = model.state_dict()
    old_vocab = ref["model.language_model.embed_tokens.weight"].shape[0]
    for key, tensor in ref.items():
        if key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(got[key][:old_vocab], tensor), key
        else:
            assert torch.equal(got[key], tensor), key
    # latent tokens were added, the rows initialised to the mean embedding
    latent_id = model.config.latent_token_id
    assert latent_id == processor.tokenizer.convert_tokens_to_ids(LATENT_PAD) >= old_vocab
    emb = got["model.language_model.embed_tokens.weight"]
    assert torch.allclose(emb[latent_id], ref["model.language_model.embed_tokens.weight"].mean(0), atol=1e-6)
    assert model.latent_stop_head.bias.item() == pytest.approx(-3.0)
    assert torch.isfinite(model.latent_stop_head.weight).all()


def test_latent_checkpoint_round_trip(stock_dir, tmp_path):
    path, _ = stock_dir
    model, processor = load_latent_model(path)
    with torch.no_grad():
        model.latent_stop_head.weight.normal_()
        model.latent_stop_head.bias.fill_(0.25)
    LatentSettings.from_config(model.config).replace(latent_mode_stage="C", latent_stop_loss_weight=1.0,
                                                      latent_null_scale=0.5).apply_to(model.config)
    save_latent_checkpoint(model, processor, tmp_path / "ckpt")
    again, processor2 = load_latent_model(tmp_path / "ckpt")
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key
    assert LatentSettings.from_config(again.config) == LatentSettings.from_config(model.config)
    assert len(processor2.tokenizer) == len(processor.tokenizer)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_latent_model(tmp_path / "nowhere")


def test_an_unsupported_model_type_is_named(stock_dir, tmp_path):
    import shutil

    path, _ = stock_dir
    shutil.copytree(path, tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    cfg["model_type"] = "llava"
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=r"config.json: model_type 'llava' is not a backbone"):
        load_latent_model(tmp_path / "other")


def test_commands_accept_a_stock_checkpoint_directory(stock_dir, tmp_path, capsys):
    """`--model PATH` of a stock Qwen2.5-VL directory works for train and infer; training saves a
    self-contained latentvl checkpoint that loads without adding anything."""
    from latentvl.cli import main
    from latentvl.data.tasks.writer import make_dataset

    path, _ = stock_dir
    make_dataset("shapes", 24, 0, tmp_path / "data")
    out = tmp_path / "run"
    code = main(["train", "--model", str(path), "--train-data", str(tmp_path / "data" / "train.jsonl"),
                 "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--stage", "A",
                 "progress_bar=false", "tensorboard=false"])
    assert code == 0
    final = out / "final"
    model, processor = load_latent_model(final)
    stock_model, stock_processor = load_latent_model(path)
    assert len(processor.tokenizer) == len(stock_processor.tokenizer)
    assert model.config.latent_token_id == stock_model.config.latent_token_id
    image = next((tmp_path / "data" / "images").glob("*-q0.png"))
    for model_dir in (path, final):
        capsys.readouterr()
        code = main(["infer", "--model", str(model_dir), "--image", str(image), "--question", "Colour?",
                     "--budgets", "2", "--max-new-tokens", "3", "--json"])
        assert code == 0
        result = json.loads(capsys.readouterr().out)
        result = result[0] if isinstance(result, list) else result
        assert result["budgets"] == [2] and result["error"] is None
