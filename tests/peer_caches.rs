//! Peers' activation caches as data specs: safetensors shards and a SAELens
//! activation cache (HF `datasets` Arrow, as `CacheActivationsRunner`
//! writes it) train exactly as the same rows saved as `.npy`, work for
//! `sae eval` / `sae encode --data`, stream where they can, and bad ones
//! are one-line user errors naming the file.

mod common;
use common::*;
use std::path::Path;

/// A small config: in memory, shuffled with a fixed seed, valid rows split off.
fn config(d: &Path) -> String {
    write_config(
        d,
        "c.yaml",
        "seed: 3\ndevice: cpu\ndata:\n  train: x.npy\n  valid_fraction: 0.1\nmodel:\n  d_hidden: 24\n  \
         activation: relu\nsparsity:\n  penalty: l1\n  weight: 0.01\ntrain:\n  epochs: 2\n  \
         batch_size: 64\n  threads: 1\n",
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Two safetensors shards (float16, then float32) and the same rows as one
/// float32 `.npy` (the float16 values widened exactly).
#[test]
fn safetensors_shards_train_like_npy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let shards = d.join("shards");
    let npy = d.join("same.npy");
    py(
        "import sys, os, numpy as np, torch, safetensors.torch as st\n\
         rng = np.random.default_rng(0)\n\
         x = np.maximum(rng.standard_normal((700, 12)), 0).astype(np.float32)\n\
         a, b = x[:300].astype(np.float16), x[300:]\n\
         os.makedirs(sys.argv[1])\n\
         # Names sort in row order; the float32 shard's tensor is named differently.\n\
         st.save_file({'acts': torch.from_numpy(a)}, sys.argv[1] + '/part-0.safetensors')\n\
         st.save_file({'x': torch.from_numpy(b)}, sys.argv[1] + '/part-1.safetensors')\n\
         np.save(sys.argv[2], np.concatenate([a.astype(np.float32), b]))\n",
        &[s(&shards), s(&npy)],
    );
    let cfg = config(d);
    let train = |name: &str, data: &Path| {
        Case::new(d, name)
            .config(&cfg)
            .set(format!("data.train={}", s(data)))
            .train()
    };
    let from_npy = train("npy", &npy);
    let from_st = train("st", &shards);
    assert!(
        from_npy.model_bytes() == from_st.model_bytes(),
        "training on the safetensors shards differs from training on the same .npy"
    );
    // eval and encode read the shards as they read the .npy.
    let eval = |data: &Path| {
        let out = sae_ok(&[
            "eval",
            "--model",
            from_npy.path(),
            "--data",
            s(data),
            "--json",
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let (e_npy, e_st) = (eval(&npy), eval(&shards));
    assert_eq!(e_npy["mse"], e_st["mse"]);
    assert_eq!(e_npy["l0"], e_st["l0"]);
    let codes = |data: &Path, out: &str| {
        let out = d.join(out);
        from_npy.apply("encode", data, &out, &["--batch-size", "100"]);
        std::fs::read(out).unwrap()
    };
    assert!(
        codes(&npy, "c_npy.npy") == codes(&shards, "c_st.npy"),
        "sae encode on the shards differs from the .npy"
    );
    // A single bfloat16 file, and `file.safetensors:NAME` picking one of two.
    let bf = d.join("bf.safetensors");
    let two = d.join("two.safetensors");
    let bf_npy = d.join("bf.npy");
    py(
        "import sys, numpy as np, torch, safetensors.torch as st\n\
         x = torch.from_numpy(np.load(sys.argv[1]))\n\
         st.save_file({'acts': x.bfloat16()}, sys.argv[2])\n\
         np.save(sys.argv[3], x.bfloat16().float().numpy())\n\
         st.save_file({'acts': x, 'tokens': torch.zeros(700, dtype=torch.int64)}, sys.argv[4])\n",
        &[s(&npy), s(&bf), s(&bf_npy), s(&two)],
    );
    assert!(train("bf", &bf).model_bytes() == train("bf-npy", &bf_npy).model_bytes());
    let named = d.join("two.safetensors:acts");
    assert!(train("named", &named).model_bytes() == from_npy.model_bytes());
    // data.stream maps a single float32 file: the same model as streaming
    // the .npy (no shuffle: the same batches).
    let streamed = |name: &str, data: &Path| {
        Case::new(d, name).config(&cfg).sets([
            format!("data.train={}", s(data)),
            "data.stream=true".into(),
            "data.valid_fraction=0".into(),
            "train.shuffle=false".into(),
        ])
    };
    let a = streamed("stream-npy", &npy).train().model_bytes();
    let b = streamed("stream-st", &named).train().model_bytes();
    assert!(
        a == b,
        "streaming x.safetensors:acts differs from streaming the .npy"
    );
    // A directory of shards, or float16 values, cannot be mapped: the way out.
    streamed("stream-dir", &shards).fails(&["data.stream: false", "python -c", "shards"]);
    streamed("stream-bf", &bf).fails(&["data.stream: false", "BF16"]);
}

/// A cache as CacheActivationsRunner builds it: `Array2D(shape=(ctx, d_in))`
/// under the hook's name plus `token_ids`, saved in two shards.
#[test]
fn saelens_activation_cache_trains_like_npy() {
    if !python_module_available(
        "saelens_activation_cache_trains_like_npy",
        "datasets",
        "make saelens",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cache = d.join("in/cache");
    let npy = d.join("in/same.npy");
    std::fs::create_dir(d.join("in")).unwrap();
    py(
        "import sys, numpy as np\n\
         from datasets import Array2D, Dataset, Features, Sequence, Value\n\
         n, ctx, d_in, hook = 40, 16, 12, 'blocks.0.hook_resid_pre'\n\
         rng = np.random.default_rng(1)\n\
         acts = rng.standard_normal((n, ctx, d_in)).astype(np.float32)\n\
         # As CacheActivationsRunner.__init__ / _create_shard build them.\n\
         features = Features({hook: Array2D(shape=(ctx, d_in), dtype='float32'),\n\
                              'token_ids': Sequence(Value(dtype='int32'), length=ctx)})\n\
         ids = rng.integers(0, 100, (n, ctx)).astype(np.int32)\n\
         ds = Dataset.from_dict({hook: acts, 'token_ids': ids}, features=features)\n\
         ds.save_to_disk(sys.argv[1], num_shards=2)\n\
         np.save(sys.argv[2], acts.reshape(n * ctx, d_in))\n",
        &[s(&cache), s(&npy)],
    );
    let arrows: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "arrow"))
        .collect();
    assert_eq!(arrows.len(), 2, "the fixture should be two shards");
    let cfg = config(d);
    let train = |name: &str, data: &str| {
        Case::new(d, name)
            .config(&cfg)
            .set(format!("data.train={data}"))
            .train()
    };
    let from_npy = train("npy", s(&npy));
    let from_cache = train("cache", s(&cache));
    assert!(
        from_npy.model_bytes() == from_cache.model_bytes(),
        "training on the cache differs from training on its activations as .npy"
    );
    // Naming the column gives the same; eval and encode read the cache too.
    let named = format!("{}:blocks.0.hook_resid_pre", s(&cache));
    assert!(train("named", &named).model_bytes() == from_npy.model_bytes());
    let eval = |data: &str| {
        let out = sae_ok(&["eval", "--model", from_npy.path(), "--data", data, "--json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let (e_npy, e_cache) = (eval(s(&npy)), eval(s(&cache)));
    assert_eq!(e_npy["mse"], e_cache["mse"]);
    assert_eq!(e_npy["l0"], e_cache["l0"]);
    // A batch size that straddles the record batches and the files.
    let codes = |data: &Path, out: &str| {
        let out = d.join(out);
        from_npy.apply("encode", data, &out, &["--batch-size", "37"]);
        std::fs::read(out).unwrap()
    };
    assert!(codes(&npy, "c_npy.npy") == codes(&cache, "c_cache.npy"));
    // data.stream cannot read a cache: the conversion one-liner, which works.
    let err = Case::new(d, "stream")
        .config(&cfg)
        .sets([
            format!("data.train={}", s(&cache)),
            "data.stream=true".into(),
            "data.valid_fraction=0".into(),
        ])
        .fails(&["data.stream: false", "load_from_disk"]);
    let snippet = err
        .split("python -c \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a python -c snippet");
    run_ok(
        std::process::Command::new(python())
            .current_dir(d)
            .args(["-c", snippet]),
        "the conversion one-liner",
    );
    assert!(
        std::fs::read(d.join("x.npy")).unwrap() == std::fs::read(&npy).unwrap(),
        "the one-liner's x.npy differs from the activations"
    );
}

#[test]
fn bad_peer_caches_are_user_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Inputs apart from the run directories (DIR/<case name>).
    std::fs::create_dir(d.join("in")).unwrap();
    let p = |name: &str| d.join("in").join(name).display().to_string();
    py(
        "import sys, torch, safetensors.torch as st\n\
         st.save_file({'a': torch.zeros(4, 3), 'b': torch.zeros(4, 3)}, sys.argv[1])\n\
         st.save_file({'a': torch.zeros(2, 4, 3)}, sys.argv[2])\n\
         st.save_file({'a': torch.zeros(4, 3, dtype=torch.int32)}, sys.argv[3])\n",
        &[
            &p("two.safetensors"),
            &p("three_d.safetensors"),
            &p("int.safetensors"),
        ],
    );
    std::fs::write(p("junk.safetensors"), b"not a safetensors file").unwrap();
    let cfg = config(d);
    let case = |name: &str, data: &str| {
        Case::new(d, name)
            .config(&cfg)
            .set(format!("data.train={data}"))
    };
    case("two", &p("two.safetensors")).fails(&[
        &p("two.safetensors"),
        "2 tensors",
        "a, b",
        ":NAME",
    ]);
    case("key", &format!("{}:c", p("two.safetensors"))).fails(&[
        &p("two.safetensors"),
        "no tensor `c`",
        "a, b",
    ]);
    case("3d", &p("three_d.safetensors")).fails(&[&p("three_d.safetensors"), "[2, 4, 3]", "2-D"]);
    case("int", &p("int.safetensors")).fails(&[&p("int.safetensors"), "I32", "float32"]);
    case("junk", &p("junk.safetensors"))
        .fails(&[&p("junk.safetensors"), "not a valid .safetensors"]);
    case("missing", &p("missing.safetensors")).fails(&[&p("missing.safetensors"), "no such file"]);
    // A data file of another kind next to the shards.
    std::fs::create_dir(p("mixed")).unwrap();
    std::fs::copy(p("three_d.safetensors"), p("mixed/a.safetensors")).unwrap();
    std::fs::write(p("mixed/b.npy"), b"").unwrap();
    case("mixed", &p("mixed")).fails(&[&p("mixed"), ".npy and .safetensors"]);

    if !python_module_available(
        "bad_peer_caches_are_user_errors",
        "datasets",
        "make saelens",
    ) {
        return;
    }
    py(
        "import sys, numpy as np\n\
         from datasets import Array2D, Dataset, Features, Sequence, Value\n\
         ids = Features({'token_ids': Sequence(Value(dtype='int32'), length=4)})\n\
         Dataset.from_dict({'token_ids': np.zeros((3, 4), np.int32)}, features=ids).save_to_disk(sys.argv[1])\n\
         f = Features({'h1': Array2D(shape=(4, 3), dtype='float32'), 'h2': Array2D(shape=(4, 3), dtype='float32')})\n\
         x = np.zeros((3, 4, 3), np.float32)\n\
         Dataset.from_dict({'h1': x, 'h2': x}, features=f).save_to_disk(sys.argv[2])\n\
         f = Features({'h': Array2D(shape=(4, 3), dtype='float32')})\n\
         Dataset.from_dict({'h': x}, features=f).save_to_disk(sys.argv[3], num_shards=2)\n",
        &[&p("ids_only"), &p("two_hooks"), &p("broken")],
    );
    case("ids-only", &p("ids_only")).fails(&[&p("ids_only"), "no activation column", "token_ids"]);
    case("two-hooks", &p("two_hooks")).fails(&[&p("two_hooks"), "h1, h2", ":COLUMN"]);
    case("no-column", &format!("{}:h3", p("two_hooks"))).fails(&["no column `h3`", "h1, h2"]);
    case("token-column", &format!("{}:token_ids", p("ids_only")))
        .fails(&[&p("ids_only"), "not a [context_size, d_in] float array"]);
    // An unreadable shard: garbage, then one cut short.
    let shard = d.join("in/broken/data-00001-of-00002.arrow");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, b"garbage, not Arrow").unwrap();
    case("garbage", &p("broken")).fails(&[s(&shard), "Arrow IPC stream"]);
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    case("truncated", &p("broken")).fails(&[s(&shard)]);
    std::fs::remove_file(&shard).unwrap();
    case("missing-shard", &p("broken")).fails(&[s(&shard), "cannot open"]);
}
