// AudioWorklet processor: microphone audio -> 16 kHz mono Int16 PCM in fixed-size chunks.
//
// Runs on the audio rendering thread. The page asks for a 16 kHz AudioContext, so the browser
// resamples the microphone itself (Chromium does, with its own sinc resampler) and this
// processor only mixes to mono, converts Float32 to Int16 and batches. Only when a browser
// refuses a microphone in a context of another rate does the context run at the device's rate;
// then `Resampler` below brings it to 16 kHz (a Kaiser-windowed sinc, checked against soxr in
// tests/browser/test_audio_path_browser.py).
//
// Messages to the main thread: {type: "chunk", pcm: ArrayBuffer, rms, peak} every chunkSamples
// output samples (1280 = 80 ms at 16 kHz, the chunk size Flux recommends), and {type: "flushed"}
// after a "flush" request (with the partial last chunk sent first).

const PHASES = 512; // fractional positions tabulated; the kernel is interpolated between them
const STOPBAND_DB = 80;

function besselI0(x) {
  let sum = 1;
  let term = 1;
  for (let k = 1; k < 50; k++) {
    term *= (x / (2 * k)) ** 2;
    sum += term;
    if (term < 1e-12 * sum) break;
  }
  return sum;
}

/** Low-pass interpolation from `inRate` to `outRate` (any ratio), for the fallback path only. */
class Resampler {
  constructor(inRate, outRate) {
    const nyquist = Math.min(inRate, outRate) / 2;
    // Pass to 90% of the output's Nyquist frequency (7.2 kHz at 16 kHz), stop by its Nyquist
    // frequency, so nothing above 8 kHz aliases into the band the recogniser listens to.
    const pass = 0.9 * nyquist;
    const cutoff = (pass + nyquist) / 2 / inRate; // cycles per input sample
    const width = (nyquist - pass) / inRate;
    const beta = 0.1102 * (STOPBAND_DB - 8.7);
    this.half = Math.ceil((STOPBAND_DB - 7.95) / (14.36 * width) / 2);
    const taps = 2 * this.half;
    this.taps = taps;
    this.step = inRate / outRate;
    // table[p * taps + j]: weight of input sample (base - half + 1 + j) for an output at base + p / PHASES.
    this.table = new Float32Array((PHASES + 1) * taps);
    const norm = besselI0(beta);
    for (let p = 0; p <= PHASES; p++) {
      const frac = p / PHASES;
      for (let j = 0; j < taps; j++) {
        const x = j - this.half + 1 - frac;
        const r = x / this.half;
        const window = Math.abs(r) >= 1 ? 0 : besselI0(beta * Math.sqrt(1 - r * r)) / norm;
        const arg = 2 * Math.PI * cutoff * x;
        this.table[p * taps + j] = 2 * cutoff * (x === 0 ? 1 : Math.sin(arg) / arg) * window;
      }
    }
    // Zeros before the first sample, so the first output is centred on the first input sample
    // (nothing at the start is used as history only, nothing is delayed).
    this.input = new Float32Array(8192);
    this.length = this.half - 1;
    this.position = this.half - 1; // next output position, in input samples from input[0]
  }

  /** Emit the outputs the lookahead still holds back (the samples after the last taken as zeros). */
  drain(emit) {
    const end = this.length; // outputs centred before this are owed; later ones would be made up
    const zeros = new Float32Array(this.half);
    this.process(zeros, zeros.length, emit, end);
  }

  /** Append `frames` input samples; call `emit(sample)` for every output sample now computable. */
  process(samples, frames, emit, limit = Infinity) {
    if (this.length + frames > this.input.length) {
      const bigger = new Float32Array(Math.max(this.input.length * 2, this.length + frames));
      bigger.set(this.input.subarray(0, this.length));
      this.input = bigger;
    }
    this.input.set(samples.subarray(0, frames), this.length);
    this.length += frames;
    const { input, table, taps, half } = this;
    let t = this.position;
    while (Math.floor(t) + half < this.length && t < limit) {
      const base = Math.floor(t);
      const where = (t - base) * PHASES;
      const p = Math.floor(where);
      const mix = where - p;
      const a = p * taps;
      const b = a + taps;
      const first = base - half + 1;
      let acc = 0;
      for (let j = 0; j < taps; j++) {
        acc += input[first + j] * (table[a + j] + mix * (table[b + j] - table[a + j]));
      }
      emit(acc);
      t += this.step;
    }
    const drop = Math.max(0, Math.floor(t) - half + 1); // keep only the history still needed
    if (drop > 0) {
      input.copyWithin(0, drop, this.length);
      this.length -= drop;
      t -= drop;
    }
    this.position = t;
  }
}

class PcmCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    const outRate = opts.targetRate || 16000;
    this.chunkSamples = opts.chunkSamples || 1280;
    // sampleRate: the AudioWorkletGlobalScope's, i.e. the context's.
    this.resampler = sampleRate === outRate ? null : new Resampler(sampleRate, outRate);
    this.chunk = new Int16Array(this.chunkSamples);
    this.chunkLength = 0;
    this.sumSquares = 0;
    this.peak = 0;
    this.push = this.push.bind(this);
    this.port.onmessage = (event) => {
      if (event.data === "flush") {
        if (this.resampler) this.resampler.drain(this.push);
        this.emit(true);
        this.port.postMessage({ type: "flushed" });
      }
    };
  }

  push(sample) {
    const s = sample > 1 ? 1 : sample < -1 ? -1 : sample;
    this.sumSquares += s * s;
    const a = s < 0 ? -s : s;
    if (a > this.peak) this.peak = a;
    // Full-scale conversion (x 32768, the usual Float32 <-> Int16 mapping), clipped at +32767.
    this.chunk[this.chunkLength++] = Math.max(-32768, Math.min(32767, Math.round(s * 32768)));
    if (this.chunkLength === this.chunkSamples) this.emit(false);
  }

  emit(partial) {
    const n = this.chunkLength;
    if (n === 0) return;
    const pcm = partial ? this.chunk.slice(0, n).buffer : this.chunk.buffer;
    this.port.postMessage({ type: "chunk", pcm, rms: Math.sqrt(this.sumSquares / n), peak: this.peak }, [pcm]);
    this.chunk = new Int16Array(this.chunkSamples);
    this.chunkLength = 0;
    this.sumSquares = 0;
    this.peak = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // not connected yet: nothing to lose
    const frames = channels[0].length;
    let mono = channels[0];
    if (channels.length > 1) {
      if (this.mono === undefined || this.mono.length !== frames) this.mono = new Float32Array(frames);
      mono = this.mono;
      mono.fill(0);
      for (const channel of channels) for (let i = 0; i < frames; i++) mono[i] += channel[i];
      for (let i = 0; i < frames; i++) mono[i] /= channels.length;
    }
    if (this.resampler) this.resampler.process(mono, frames, this.push);
    else for (let i = 0; i < frames; i++) this.push(mono[i]);
    return true;
  }
}

registerProcessor("relay-pcm-capture", PcmCaptureProcessor);
