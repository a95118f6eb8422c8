// Command pagedserve-generate streams one completion from a pagedserve gateway and prints the text
// as it arrives. With -chat the prompt is a user message (after an optional -system message) and the
// gateway applies the model's chat template (the Chat RPC).
//
//	pagedserve-generate -target localhost:50051 -prompt "Hello, paged world" -max-tokens 32
//	pagedserve-generate -chat -system "Answer briefly." -prompt "What is the capital of France?"
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	pagedservev1 "pagedserve/v1"
)

func main() {
	target := flag.String("target", "localhost:50051", "gateway address, host:port")
	prompt := flag.String("prompt", "Hello, paged world", "prompt text")
	maxTokens := flag.Uint("max-tokens", 32, "largest number of tokens to generate")
	temperature := flag.Float64("temperature", 0, "softmax temperature, 0 is greedy; when not given, the server's default (1.0)")
	seed := flag.Uint64("seed", 0, "seed of the request's random choices; when not given, the server draws one")
	chat := flag.Bool("chat", false, "send the prompt as a user message through the model's chat template")
	system := flag.String("system", "", "with -chat: a system message before the prompt")
	flag.Parse()

	// temperature and seed are optional fields: send them only when given on the command line, so
	// that the server's defaults apply otherwise.
	given := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { given[f.Name] = true })
	params := &pagedservev1.SamplingParams{MaxTokens: uint32(*maxTokens)}
	if given["temperature"] {
		t := float32(*temperature)
		params.Temperature = &t
	}
	if given["seed"] {
		params.Seed = seed
	}

	// Ctrl-C cancels the call; the gateway then aborts the request and frees its blocks.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	open := func(client pagedservev1.GenerationServiceClient) (stream, error) {
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
	if err := generate(ctx, *target, open); err != nil {
		stop()
		s := status.Convert(err)
		fmt.Fprintf(os.Stderr, "pagedserve-generate: %s: %s\n", s.Code(), s.Message())
		os.Exit(1)
	}
}

// stream is what Generate and Chat both return: the responses of one call.
type stream interface {
	Recv() (*pagedservev1.GenerateResponse, error)
}

// generate opens a call on a connection to target and writes the streamed text deltas to stdout as
// they arrive, then a newline (also when the stream fails after some text).
func generate(ctx context.Context, target string, open func(pagedservev1.GenerationServiceClient) (stream, error)) error {
	// The grpc-go of Debian bookworm (1.33) predates credentials/insecure; WithInsecure is its
	// spelling of a plaintext connection.
	conn, err := grpc.DialContext(ctx, target, grpc.WithInsecure())
	if err != nil {
		return err
	}
	defer conn.Close()

	responses, err := open(pagedservev1.NewGenerationServiceClient(conn))
	if err != nil {
		return err
	}
	printed := false
	for {
		resp, err := responses.Recv()
		if err == io.EOF {
			fmt.Println()
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
	}
}
