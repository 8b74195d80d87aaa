// The jobs of this browser: kept in local storage by id, each followed live over its event stream until it ends.
// A queued job shows its place in the queue and ETA (asked again every few seconds, as the stream only tells when
// it starts), a running one its progress and previews, an ended one its images, seeds and parameters.

import { ApiError, apiKey, call, getJson, imageBlob, servedHere } from "./api.js";
import { curlCommand } from "./curl.js";
import { followEvents } from "./events.js";

const STORE = "sdqueue.jobs";
const KEEP = 50; // jobs remembered; older ones leave the list (the server keeps them for SDQ_RESULT_TTL_S)
const POLL_MS = 3000;
// A browser opens at most 6 HTTP/1.1 connections to one server: streams beyond these wait (their jobs polled
// meanwhile), so that submits and downloads always find a connection.
const MAX_STREAMS = 4;
const EXTENSIONS = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };

function seconds(value) {
  return value < 10 ? `${value.toFixed(1)} s` : `${Math.round(value)} s`;
}

class Slots {
  constructor(count) {
    this.free = count;
    this.waiting = [];
  }

  take(signal) {
    if (this.free > 0) {
      this.free -= 1;
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const waiter = { resolve };
      this.waiting.push(waiter);
      signal.addEventListener("abort", () => {
        this.waiting = this.waiting.filter((w) => w !== waiter);
        reject(new DOMException("aborted", "AbortError"));
      }, { once: true });
    });
  }

  give() {
    const next = this.waiting.shift();
    if (next) next.resolve();
    else this.free += 1;
  }
}

export class JobList {
  constructor({ list, empty, jobTemplate, imageTemplate, onUseAsInit, onReuseSeed }) {
    Object.assign(this, { list, empty, jobTemplate, imageTemplate, onUseAsInit, onReuseSeed });
    this.cards = new Map();
    this.streams = new Slots(MAX_STREAMS);
  }

  stored() {
    try {
      const entries = JSON.parse(localStorage.getItem(STORE) || "[]");
      return Array.isArray(entries) ? entries : [];
    } catch {
      return [];
    }
  }

  save() {
    const entries = [...this.cards.values()].map((card) => card.entry).reverse().slice(0, KEEP);
    localStorage.setItem(STORE, JSON.stringify(entries));
  }

  // Follows the jobs of earlier visits again (an ended job's stream answers its final event at once).
  restore() {
    for (const entry of this.stored().slice(0, KEEP).reverse()) this.show(entry, null);
  }

  // `entry`: {id, endpoint, request (the body without images), hasMask}; `job`: the submit answer.
  // The new card's element.
  add(entry, job) {
    const card = this.show(entry, job);
    this.save();
    return card.root;
  }

  show(entry, job) {
    const card = new JobCard(entry, this);
    this.cards.set(entry.id, card);
    this.list.prepend(card.root);
    this.empty.hidden = true;
    if (job) card.render(job);
    card.follow();
    return card;
  }

  remove(card) {
    card.stop();
    for (const url of card.objectUrls) URL.revokeObjectURL(url);
    card.root.remove();
    this.cards.delete(card.entry.id);
    this.empty.hidden = this.cards.size > 0;
    this.save();
  }

  // Follows again the jobs that could not be read (e.g. with no key or a wrong one, before the right key).
  retryUnavailable() {
    for (const card of this.cards.values()) {
      if (card.root.dataset.status === "unavailable") {
        card.showError("");
        card.setStatus("connecting");
        card.follow();
      }
    }
  }

  // The first seed of the newest job that has one.
  lastSeed() {
    const cards = [...this.cards.values()].reverse();
    const card = cards.find((c) => c.job && c.job.seeds.length);
    return card ? card.job.seeds[0] : null;
  }
}

class JobCard {
  constructor(entry, owner) {
    this.entry = entry;
    this.owner = owner;
    this.job = null;
    this.streaming = false;
    this.imagesShown = false;
    this.objectUrls = [];
    this.abort = new AbortController();
    this.poll = null;
    this.root = owner.jobTemplate.content.firstElementChild.cloneNode(true);
    const $ = (selector) => this.root.querySelector(selector);
    Object.assign(this, {
      task: $(".job-task"), status: $(".job-status"), prompt: $(".job-prompt"), queue: $(".job-queue"),
      progressBox: $(".job-progress"), bar: $("progress"), step: $(".job-step"), preview: $(".job-preview"),
      images: $(".job-images"), error: $(".job-error"), params: $(".job-params pre"), cancel: $(".job-cancel"),
      copyCurl: $(".job-copy-curl"), curl: $(".job-curl"),
    });
    this.root.dataset.jobId = entry.id;
    this.task.textContent = entry.endpoint.split("/").pop();
    this.prompt.textContent = entry.request.prompt;
    this.setStatus("connecting");
    this.cancel.addEventListener("click", () => this.requestCancel());
    this.copyCurl.addEventListener("click", () => this.showCurl());
    $(".job-remove").addEventListener("click", () => owner.remove(this));
  }

  setStatus(status, detail = "") {
    this.root.dataset.status = status;
    this.status.textContent = detail ? `${status} ${detail}` : status;
  }

  showError(message) {
    this.error.hidden = !message;
    this.error.textContent = message;
  }

  ended() {
    return this.job !== null && ["succeeded", "failed", "canceled"].includes(this.job.status);
  }

  async follow() {
    this.startPolling(); // until a stream is free
    try {
      await this.owner.streams.take(this.abort.signal);
    } catch {
      return; // removed while it waited
    }
    try {
      if (this.ended()) return;
      this.streaming = true;
      await followEvents(`v1/jobs/${this.entry.id}/events`, (name, data) => this.onEvent(name, data),
        { signal: this.abort.signal });
    } catch (err) {
      if (err.name === "AbortError") return;
      this.setStatus("unavailable");
      this.showError(err instanceof ApiError ? err.describe() : String(err));
    } finally {
      this.streaming = false;
      this.stopPolling();
      this.owner.streams.give();
    }
  }

  stop() {
    this.abort.abort();
    this.stopPolling();
  }

  onEvent(name, data) {
    if (name === "queued" || name === "succeeded" || name === "failed" || name === "canceled") {
      this.render(data);
    } else if (name === "running") {
      this.stopPolling();
      this.queue.hidden = true;
      this.setStatus("running");
      this.showProgress({ step: 0, total: this.job?.params.steps ?? 0, percent: 0 });
    } else if (name === "progress") {
      if (this.root.dataset.status !== "canceling") this.setStatus("running");
      this.showProgress(data);
    } else if (name === "preview") {
      this.preview.src = `data:image/jpeg;base64,${data.image}`;
      this.preview.hidden = false;
    }
  }

  showProgress({ step, total, percent, eta_seconds: eta }) {
    this.progressBox.hidden = false;
    this.bar.value = percent;
    this.bar.textContent = `${Math.round(percent)}%`;
    const left = eta === null || eta === undefined ? "" : ` · ${seconds(eta)} left`;
    this.step.textContent = total ? `step ${step} of ${total}${left}` : "";
  }

  // Shows a job as GET /v1/jobs/{id} gives it.
  render(job) {
    this.job = job;
    this.prompt.textContent = job.params.prompt;
    const ended = ["succeeded", "failed", "canceled"].includes(job.status);
    const took = job.status === "succeeded" && job.timings.total_seconds !== null
      ? `in ${seconds(job.timings.total_seconds)}` : "";
    if (this.root.dataset.status !== "canceling" || ended) this.setStatus(job.status, took);
    this.cancel.hidden = ended;
    this.queue.hidden = job.status !== "queued";
    if (job.status === "queued") {
      const ahead = job.queue_position ?? 0;
      const eta = job.progress.eta_seconds;
      const place = ahead === 0 ? "next in the queue" : `${ahead} ${ahead === 1 ? "job" : "jobs"} ahead`;
      this.queue.textContent = eta === null || eta === undefined ? place : `${place} · starts in about ${seconds(eta)}`;
    }
    if (job.status === "queued" || (!this.streaming && !ended)) this.startPolling();
    else this.stopPolling();
    if (job.status === "running" || job.status === "succeeded") this.showProgress(job.progress);
    if (job.status === "succeeded") this.preview.hidden = true;
    const parameters = { task: job.task, ...job.params, strength: job.strength ?? undefined, seeds: job.seeds };
    delete parameters.webhook_events_filter;
    this.params.textContent = JSON.stringify(parameters, null, 2);
    const problems = [job.error ? `${job.error.type}: ${job.error.message}` : "", ...job.warnings];
    this.showError(problems.filter(Boolean).join("\n"));
    if (job.status === "succeeded" && !this.imagesShown) {
      this.imagesShown = true;
      job.images.forEach((record, index) => this.showImage(record, index));
    }
  }

  startPolling() {
    if (this.poll !== null) return;
    this.poll = setInterval(async () => {
      try {
        const job = await getJson(`v1/jobs/${this.entry.id}`, { signal: this.abort.signal });
        // Once streaming, only the queue position: what comes after, the event stream shows.
        if (!this.streaming || job.status === "queued") this.render(job);
      } catch {
        // the stream reports what matters; a missed update is not worth a message
      }
    }, POLL_MS);
  }

  stopPolling() {
    if (this.poll !== null) clearInterval(this.poll);
    this.poll = null;
  }

  async showImage(record, index) {
    const figure = this.owner.imageTemplate.content.firstElementChild.cloneNode(true);
    const img = figure.querySelector("img");
    const download = figure.querySelector(".result-download");
    img.width = record.width;
    img.height = record.height;
    img.alt = `Image ${index + 1} of the job, seed ${record.seed}`;
    figure.querySelector(".result-seed").textContent = `seed ${record.seed}`;
    download.download = `${this.entry.id}-${index}.${EXTENSIONS[record.content_type] ?? "png"}`;
    this.images.append(figure);
    let blob = null;
    try {
      blob = await imageBlob(record);
    } catch (err) {
      if (servedHere(record)) {
        this.showError(err instanceof ApiError ? err.describe() : String(err));
        return;
      }
    }
    const src = blob ? URL.createObjectURL(blob) : record.url; // a bucket without CORS: shown, not read
    if (blob) this.objectUrls.push(src);
    img.src = src;
    download.href = src;
    figure.querySelector(".result-init").addEventListener("click", async () => {
      try {
        this.owner.onUseAsInit(blob ?? await imageBlob(record), download.download);
      } catch (err) {
        this.showError(err instanceof ApiError ? err.describe() : String(err));
      }
    });
    figure.querySelector(".result-reuse-seed").addEventListener("click", () => this.owner.onReuseSeed(record.seed));
  }

  async requestCancel() {
    this.cancel.disabled = true;
    try {
      const response = await call(`v1/jobs/${this.entry.id}/cancel`, { method: "POST" });
      const job = await response.json();
      if (response.status === 202) this.setStatus("canceling"); // running: it stops after the current step
      else this.render(job);
    } catch (err) {
      this.showError(err instanceof ApiError ? err.describe() : String(err));
    } finally {
      this.cancel.disabled = false;
    }
  }

  async showCurl() {
    this.curl.value = curlCommand({
      endpoint: this.entry.endpoint, request: this.entry.request, seed: this.job?.seeds[0] ?? this.entry.request.seed,
      withKey: apiKey() !== "", hasMask: this.entry.hasMask,
    });
    this.curl.hidden = false;
    this.curl.select();
    try {
      await navigator.clipboard.writeText(this.curl.value);
      this.copyCurl.textContent = "Copied";
    } catch {
      this.copyCurl.textContent = "Selected: copy it";  // no clipboard access (plain http on another host)
    }
  }
}
