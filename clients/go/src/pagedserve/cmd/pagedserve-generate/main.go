// Command pagedserve-generate streams one completion from a pagedserve gateway and prints the text
// as it arrives.
//
//	pagedserve-generate -target localhost:50051 -prompt "Hello, paged world" -max-tokens 32
//	pagedserve-generate -chat -system "Answer briefly." -prompt "What is the capital of France?"
//
// -json-schema FILE, -regex RE or -choice A,B,C constrain the output (structured output).
// With -chat the prompt is a user message (after -system's, if given) that the gateway's Chat RPC
// renders through the model's chat template.
// With -logprobs N each token's log probability and its N most likely alternatives follow the text,
// one line per token. A gateway with TLS takes -tls (or -tls-ca FILE; mutual TLS: -tls-cert and
// -tls-key too), one with a token -token-file FILE.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"os"
	"os/signal"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pagedservev1 "pagedserve/v1"
)

// security holds the connection options given on the command line.
type security struct {
	tls                       bool
	caFile, certFile, keyFile string
	tokenFile                 string
}

func main() {
	target := flag.String("target", "localhost:50051", "gateway address, host:port")
	prompt := flag.String("prompt", "Hello, paged world", "prompt text")
	maxTokens := flag.Uint("max-tokens", 32, "largest number of tokens to generate")
	temperature := flag.Float64("temperature", 0, "softmax temperature, 0 is greedy; when not given, the server's default (1.0)")
	seed := flag.Uint64("seed", 0, "seed of the request's random choices; when not given, the server draws one")
	logprobs := flag.Uint("logprobs", 0, "print each token's log probability and its N most likely alternatives (0 to 20); when not given, none")
	var sec security
	flag.BoolVar(&sec.tls, "tls", false, "speak TLS, checking the server's certificate against the system's roots (or -tls-ca)")
	flag.StringVar(&sec.caFile, "tls-ca", "", "PEM file of the CA that signed the server's certificate (implies -tls)")
	flag.StringVar(&sec.certFile, "tls-cert", "", "client certificate (PEM) for mutual TLS, with -tls-key")
	flag.StringVar(&sec.keyFile, "tls-key", "", "private key (PEM) of -tls-cert")
	flag.StringVar(&sec.tokenFile, "token-file", "", "file holding the bearer token to send")
	chat := flag.Bool("chat", false, "send the prompt as a user message through the model's chat template")
	system := flag.String("system", "", "with -chat: a system message before the prompt")
	minTokens := flag.Uint("min-tokens", 0, "generate at least this many tokens before a stop may end the sample")
	presence := flag.Float64("presence-penalty", 0, "OpenAI's presence penalty over the generated tokens, -2 to 2")
	frequency := flag.Float64("frequency-penalty", 0, "OpenAI's frequency penalty over the generated tokens, -2 to 2")
	bias := biasFlag{}
	flag.Var(&bias, "logit-bias", "ID=BIAS: add BIAS (-100 to 100) to token ID's logit (repeatable)")
	jsonSchema := flag.String("json-schema", "", "file holding a JSON schema the output must validate against")
	regex := flag.String("regex", "", "regular expression the whole output must match")
	choice := flag.String("choice", "", "comma-separated strings, one of which is the output")
	flag.Parse()

	// temperature, seed and logprobs are sent only when given on the command line, so that the
	// server's defaults apply otherwise.
	given := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { given[f.Name] = true })
	params := &pagedservev1.SamplingParams{
		MinTokens:        uint32(*minTokens),
		PresencePenalty:  float32(*presence),
		FrequencyPenalty: float32(*frequency),
		LogitBias:        bias,
	}
	if given["max-tokens"] || *maxTokens > 0 { // unset max_tokens: until the context ends
		m := uint32(*maxTokens)
		params.MaxTokens = &m
	}
	if given["temperature"] {
		t := float32(*temperature)
		params.Temperature = &t
	}
	if given["seed"] {
		params.Seed = seed
	}
	if given["logprobs"] {
		params.Logprobs = true
		params.TopLogprobs = uint32(*logprobs)
	}
	// At most one output constraint (the sampling parameters' oneof); the server refuses a bad one
	// with INVALID_ARGUMENT naming the field.
	switch {
	case *jsonSchema != "":
		schema, err := os.ReadFile(*jsonSchema)
		if err != nil {
			fmt.Fprintln(os.Stderr, "pagedserve-generate:", err)
			os.Exit(2)
		}
		params.Constraint = &pagedservev1.SamplingParams_JsonSchema{JsonSchema: string(schema)}
	case *regex != "":
		params.Constraint = &pagedservev1.SamplingParams_Regex{Regex: *regex}
	case *choice != "":
		params.Constraint = &pagedservev1.SamplingParams_Choice{
			Choice: &pagedservev1.Choice{Choices: strings.Split(*choice, ",")}}
	}

	// Ctrl-C cancels the call; the gateway then aborts the request and frees its blocks.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	open := func(ctx context.Context, client pagedservev1.GenerationServiceClient) (stream, error) {
		if !*chat {
			return client.Generate(ctx, &pagedservev1.GenerateRequest{
				Prompt:         &pagedservev1.GenerateRequest_Text{Text: *prompt},
				SamplingParams: params,
			})
		}
		var messages []*pagedservev1.ChatMessage
		if *system != "" {
			messages = append(messages, &pagedservev1.ChatMessage{Role: "system", Content: *system})
		}
		messages = append(messages, &pagedservev1.ChatMessage{Role: "user", Content: *prompt})
		return client.Chat(ctx, &pagedservev1.ChatRequest{Messages: messages, SamplingParams: params})
	}
	if err := generate(ctx, *target, sec, open); err != nil {
		stop()
		if s, ok := status.FromError(err); ok {
			fmt.Fprintf(os.Stderr, "pagedserve-generate: %s: %s\n", s.Code(), s.Message())
		} else {
			fmt.Fprintf(os.Stderr, "pagedserve-generate: %s\n", err)
		}
		os.Exit(1)
	}
}

// dialOptions turns the security flags into the connection's credentials.
func dialOptions(sec security) ([]grpc.DialOption, error) {
	if !sec.tls && sec.caFile == "" && sec.certFile == "" {
		// The grpc-go of Debian bookworm (1.33) predates credentials/insecure; WithInsecure is its
		// spelling of a plaintext connection.
		return []grpc.DialOption{grpc.WithInsecure()}, nil
	}
	config := &tls.Config{}
	if sec.caFile != "" {
		pem, err := ioutil.ReadFile(sec.caFile)
		if err != nil {
			return nil, err
		}
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s: no PEM certificate", sec.caFile)
		}
	}
	if sec.certFile != "" || sec.keyFile != "" {
		pair, err := tls.LoadX509KeyPair(sec.certFile, sec.keyFile)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(config))}, nil
}

// stream is what Generate and Chat both return: the responses of one call.
type stream interface {
	Recv() (*pagedservev1.GenerateResponse, error)
}

// generate opens a call on a connection to target and writes the streamed text deltas to stdout as
// they arrive, then a newline (also when the stream fails after some text), then the log
// probabilities when asked for.
func generate(ctx context.Context, target string, sec security,
	open func(context.Context, pagedservev1.GenerationServiceClient) (stream, error)) error {
	opts, err := dialOptions(sec)
	if err != nil {
		return err
	}
	if sec.tokenFile != "" {
		token, err := ioutil.ReadFile(sec.tokenFile)
		if err != nil {
			return err
		}
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+strings.TrimSpace(string(token)))
	}
	conn, err := grpc.DialContext(ctx, target, opts...)
	if err != nil {
		return err
	}
	defer conn.Close()

	calls, err := open(ctx, pagedservev1.NewGenerationServiceClient(conn)) // ctx carries the token
	if err != nil {
		return err
	}
	printed := false
	var logprobs []*pagedservev1.TokenLogprob
	for {
		resp, err := calls.Recv()
		if err == io.EOF {
			fmt.Println()
			printLogprobs(logprobs)
			return nil
		}
		if err != nil {
			if printed {
				fmt.Println()
			}
			return err
		}
		fmt.Print(resp.GetText())
		printed = true
		logprobs = append(logprobs, resp.GetLogprobs()...)
	}
}

// printLogprobs writes one line per token: "token ID: LOGPROB  top: ID:LOGPROB ...".
func printLogprobs(logprobs []*pagedservev1.TokenLogprob) {
	for _, lp := range logprobs {
		line := fmt.Sprintf("token %d: %.4f", lp.GetTokenId(), lp.GetLogprob())
		if len(lp.GetTop()) > 0 {
			alternatives := make([]string, len(lp.GetTop()))
			for i, t := range lp.GetTop() {
				alternatives[i] = fmt.Sprintf("%d:%.4f", t.GetTokenId(), t.GetLogprob())
			}
			line += "  top: " + strings.Join(alternatives, "  ")
		}
		fmt.Println(line)
	}
}

// biasFlag collects -logit-bias ID=BIAS values.
type biasFlag []*pagedservev1.LogitBias

func (b *biasFlag) String() string { return fmt.Sprint(len(*b), " entries") }

func (b *biasFlag) Set(value string) error {
	var id uint32
	var v float32
	if _, err := fmt.Sscanf(value, "%d=%g", &id, &v); err != nil {
		return fmt.Errorf("want ID=BIAS, got %q", value)
	}
	*b = append(*b, &pagedservev1.LogitBias{TokenId: id, Bias: v})
	return nil
}
