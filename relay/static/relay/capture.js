// Microphone capture: getUserMedia -> 16 kHz AudioContext -> AudioWorklet -> 80 ms Int16 chunks.

export const TARGET_RATE = 16000;
export const CHUNK_SAMPLES = 1280; // 80 ms at 16 kHz

/** A capture problem, with a sentence a person can act on. */
export class MicError extends Error {
  constructor(message, cause) {
    super(message);
    this.name = "MicError";
    this.cause = cause;
  }
}

function explain(error) {
  switch (error && error.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone access was blocked. Allow the microphone for this site (the icon in the address bar), then press Start again.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Connect one and press Start again.";
    case "NotReadableError":
    case "AbortError":
      return "The microphone could not be opened; another app may be using it. Close that app and press Start again.";
    default:
      return `The microphone could not be started (${(error && error.message) || error}).`;
  }
}

export class MicCapture {
  /**
   * @param {object} options
   * @param {string} options.workletUrl URL of pcm-worklet.js
   * @param {(pcm: ArrayBuffer, capturedAt: number) => void} options.onChunk 16 kHz mono Int16
   *   LE PCM, 80 ms, and the wall-clock ms its first sample was captured
   * @param {(rms: number, peak: number) => void} [options.onLevel]
   * @param {() => void} [options.onEnded] the microphone went away (unplugged, revoked)
   */
  constructor({ workletUrl, onChunk, onLevel = () => {}, onEnded = () => {} }) {
    this.workletUrl = workletUrl;
    this.onChunk = onChunk;
    this.onLevel = onLevel;
    this.onEnded = onEnded;
    this.stream = null;
    this.context = null;
    this.node = null;
    this.source = null;
    this.inputRate = null; // the microphone's rate, as the browser reports it
    this.path = null;
  }

  get active() {
    return this.stream !== null;
  }

  /**
   * Open the microphone and start sending. Call it from the click that starts recording: the
   * AudioContext is made before anything is awaited, while the click still counts as a user
   * gesture, so autoplay rules let it run.
   */
  async start() {
    if (!window.isSecureContext) {
      throw new MicError("The microphone needs a secure page: open this page over https:// (or on localhost).");
    }
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new MicError("This browser cannot use a microphone from a web page.");
    }
    if (typeof AudioWorkletNode === "undefined") {
      throw new MicError("This browser cannot process microphone audio here (no AudioWorklet). Try a current Chrome, Edge, Firefox or Safari.");
    }
    // Two contexts are readied before the microphone opens, so no audio is lost between the
    // device starting and the worklet listening: one at 16 kHz, where the browser resamples the
    // microphone itself, and one at the device's own rate for browsers that refuse to connect a
    // microphone to a context of another rate (the worklet resamples there). The one not used
    // is closed as soon as the microphone is connected.
    const contexts = [];
    try {
      contexts.push(new AudioContext({ sampleRate: TARGET_RATE, latencyHint: "interactive" }));
    } catch {
      // This browser makes no 16 kHz context at all: the device-rate one alone.
    }
    contexts.push(new AudioContext({ latencyHint: "interactive" }));
    const closeAll = (keep) => Promise.all(contexts.filter((c) => c !== keep).map((c) => c.close().catch(() => {})));
    let stream;
    try {
      await Promise.all(contexts.map((c) => c.audioWorklet.addModule(this.workletUrl)));
      await Promise.all(contexts.map((c) => (c.state === "suspended" ? c.resume() : null)));
    } catch (error) {
      await closeAll(null);
      throw new MicError(`Audio processing could not start (${error.message || error}).`, error);
    }
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: {
          channelCount: { ideal: 1 },
          // These "improvements" distort speech for a recogniser; it wants the raw signal.
          echoCancellation: false,
          noiseSuppression: false,
          autoGainControl: false,
        },
      });
    } catch (error) {
      await closeAll(null);
      throw new MicError(explain(error), error);
    }
    let context;
    try {
      let source;
      for (const candidate of contexts) {
        try {
          source = candidate.createMediaStreamSource(stream);
          context = candidate;
          break;
        } catch (error) {
          // NotSupportedError: a microphone at another rate than this context's (Firefox).
          if (candidate === contexts[contexts.length - 1]) throw error;
        }
      }
      const node = new AudioWorkletNode(context, "relay-pcm-capture", {
        numberOfInputs: 1,
        numberOfOutputs: 0,
        channelCountMode: "explicit",
        channelCount: 1,
        processorOptions: { targetRate: TARGET_RATE, chunkSamples: CHUNK_SAMPLES },
      });
      node.port.onmessage = (event) => this.receive(event.data);
      source.connect(node);
      this.source = source;
      this.node = node;
    } catch (error) {
      stream.getTracks().forEach((track) => track.stop());
      await closeAll(null);
      throw new MicError(`Audio processing could not start (${error.message || error}).`, error);
    }
    closeAll(context);
    this.stream = stream;
    this.context = context;
    const track = stream.getAudioTracks()[0];
    const settings = (track && track.getSettings && track.getSettings()) || {};
    this.inputRate = settings.sampleRate || context.sampleRate;
    /** How the audio reaches 16 kHz (shown in the page's data-capture for tests and support). */
    this.path = {
      contextRate: context.sampleRate,
      deviceRate: settings.sampleRate || null,
      resampler: context.sampleRate === TARGET_RATE ? "browser" : "worklet",
    };
    this.firstChunkAt = null;
    this.samples = 0;
    for (const track of stream.getAudioTracks()) {
      track.addEventListener("ended", () => {
        if (this.stream === stream) this.onEnded();
      });
    }
  }

  receive(message) {
    if (message.type === "chunk") {
      // Times follow the audio clock from the first chunk on, so chunks stay exactly contiguous.
      const samples = message.pcm.byteLength / 2;
      if (this.firstChunkAt === null) this.firstChunkAt = Date.now() - (samples / TARGET_RATE) * 1000;
      this.onChunk(message.pcm, this.firstChunkAt + (this.samples / TARGET_RATE) * 1000);
      this.samples += samples;
      this.onLevel(message.rms, message.peak);
    } else if (message.type === "flushed" && this.flushed) {
      this.flushed();
    }
  }

  /** Stop the microphone; the last partial chunk is delivered before this resolves. */
  async stop() {
    if (!this.stream) return;
    const { stream, context, node, source } = this;
    this.stream = null;
    if (node) {
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, 500); // a closed context never answers
        this.flushed = () => {
          clearTimeout(timer);
          resolve();
        };
        node.port.postMessage("flush");
      });
      this.flushed = null;
      source.disconnect();
      node.port.onmessage = null;
    }
    stream.getTracks().forEach((track) => track.stop());
    await context.close().catch(() => {});
    this.context = this.node = this.source = null;
    this.onLevel(0, 0);
  }
}
