"""Load generator for a running splitserve server: the core of ``splitserve bench`` and
``benchmarks/serving.py``.

    sender = drivers.GrpcSender("127.0.0.1:50051")
    limits = await sender.limits()
    specs = workload.synthetic(40, 2.0, (64, 512), (16, 64),
                               workload.LengthLimits(limits.vocab_size, limits.max_model_len))
    run = await runner.run_workload(specs, sender, timeout_s=600)
    await sender.close()
    summary = stats.summarize(run.results, stats.SLO(ttft_s=0.5, itl_s=0.05), run.duration_s)
    print(report.table(summary, "my run"))

Modules: ``workload`` (arrivals, lengths, random prompts, trace replay), ``drivers`` (gRPC
and HTTP senders, per-request stamps), ``runner`` (open-loop dispatch with a time limit),
``stats`` (percentiles, goodput, summaries), ``report`` (tables, JSON), ``plot`` (the
``--plot`` PNG), ``delivery`` (client gaps vs the decode workers' step times), ``launch`` (an
in-process cluster per configuration, the disaggregated vs colocated comparison) and
``cli`` (the flags both entry points share).
"""
